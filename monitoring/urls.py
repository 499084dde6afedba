from django.urls import path

from monitoring import views

urlpatterns = [
    path("healthz", views.liveness, name="healthz"),
]
