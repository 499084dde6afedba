from django.apps import AppConfig


class LobbiesConfig(AppConfig):
    name = "lobbies"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from lobbies import receivers  # noqa: F401  (connects the signal receivers)
