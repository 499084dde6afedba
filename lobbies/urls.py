from django.urls import path

from lobbies import views

urlpatterns = [
    path("", views.index, name="index"),
    path("lobby/<str:name>/", views.room, name="room"),
    path("api/sessions/", views.session_create, name="api-session-create"),
    path("api/sessions/resume/", views.session_resume, name="api-session-resume"),
    path("api/lobbies/", views.lobby_collection, name="api-lobbies"),
    path("api/lobbies/<str:name>/", views.lobby_detail, name="api-lobby-detail"),
]
