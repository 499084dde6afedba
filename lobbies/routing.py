from django.urls import re_path

from lobbies.consumers import LobbyConsumer

websocket_urlpatterns = [
    re_path(r"^ws/lobby/(?P<lobby_name>[^/]+)/$", LobbyConsumer.as_asgi()),
]
