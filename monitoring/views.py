from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from monitoring import health


@require_GET
def liveness(request: HttpRequest) -> JsonResponse:
    """The process answers. Checks no dependency, so an outage elsewhere does not get it restarted."""
    return JsonResponse({"status": "ok"})


def http_status(status: str) -> int:
    # Degraded still serves: only a critical failure takes the process out of rotation.
    return 503 if status == health.DOWN else 200


@never_cache
@require_GET
async def readiness(request: HttpRequest) -> JsonResponse:
    """200 while this process can serve (database, cache, channel layer), 503 otherwise."""
    outcomes = await health.run_probes(health.readiness_probes())
    status = health.overall_status(outcomes)
    body = {
        "status": status,
        "message": health.summary(outcomes),
        "failing": [o.name for o in outcomes if o.status == "failed"],
        "checks": {o.name: o.as_dict() for o in outcomes},
    }
    return JsonResponse(body, status=http_status(status))


def wants_json(request: HttpRequest) -> bool:
    requested = request.GET.get("format")
    if requested:
        return requested == "json"
    return "application/json" in request.headers.get("Accept", "")


@never_cache
@require_GET
async def health_page(request: HttpRequest) -> HttpResponse:
    """Every check with its latency, disk, memory and bot workers, as JSON or HTML."""
    outcomes = await health.run_probes(health.detailed_probes())
    status = health.overall_status(outcomes)
    code = http_status(status)
    if wants_json(request):
        body = {
            "status": status,
            "message": health.summary(outcomes),
            "checks": {o.name: o.as_dict() for o in outcomes},
        }
        return JsonResponse(body, status=code)
    context = {"status": status, "message": health.summary(outcomes), "outcomes": outcomes}
    return render(request, "monitoring/health.html", context, status=code)
