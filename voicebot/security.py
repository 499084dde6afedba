from urllib.parse import ParseResult

from channels.security.websocket import OriginValidator
from django.conf import settings


class BrowserOriginValidator(OriginValidator):
    """Browsers always send Origin, so one from a host we do not serve is a
    cross-site page and is refused. Clients that send none (bots, scripts)
    are not browsers and are authenticated by their token alone."""

    def valid_origin(self, parsed_origin: ParseResult | None) -> bool:
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)


def origin_validator(application):
    return BrowserOriginValidator(application, settings.ALLOWED_HOSTS)
