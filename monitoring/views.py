from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def liveness(request: HttpRequest) -> JsonResponse:
    """The process answers. Checks no dependency, so an outage elsewhere does not get it restarted."""
    return JsonResponse({"status": "ok"})
