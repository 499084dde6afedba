"""ASGI entry point: HTTP goes to Django, WebSockets to the lobby consumers.
Every server process samples its numbers for the dashboard; on the embedded
default the bot worker runs in this process too."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "voicebot.settings")
# Django must be set up before the consumers (and their models) are imported.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from lobbies.routing import websocket_urlpatterns  # noqa: E402
from voicebot.security import origin_validator  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": origin_validator(URLRouter(websocket_urlpatterns)),
    }
)

if settings.MONITORING_SAMPLE_SECONDS:
    from monitoring.sampler import SamplerMiddleware

    application = SamplerMiddleware(application)

if settings.BOTS_IN_PROCESS:
    from bots.worker import BotsInProcess

    application = BotsInProcess(application)

# What starting made (Django, the apps and their modules: about 130,000
# objects) lasts as long as the process. Frozen, a full collection no longer
# walks it: under load such a collection paused the event loop for 57-74 ms,
# enough to fail a load-test step's p99 alone; frozen, for 9-13 ms.
gc.freeze()
