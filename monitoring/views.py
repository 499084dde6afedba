import time

from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from monitoring import health, selectors

# The dashboard's windows; samples older than MONITORING_RETENTION_HOURS are gone.
DASHBOARD_WINDOWS = [(900, "15 minutes"), (3600, "1 hour"), (10800, "3 hours"), (21600, "6 hours")]


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


def dashboard_windows() -> list[tuple[int, str]]:
    retained = settings.MONITORING_RETENTION_HOURS * 3600
    return [(seconds, label) for seconds, label in DASHBOARD_WINDOWS if seconds <= retained] or DASHBOARD_WINDOWS[:1]


@never_cache
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    """The staff performance dashboard (wrapped in admin_view in voicebot/urls.py)."""
    context = {
        **admin.site.each_context(request),
        "title": "Performance dashboard",
        "data_url": reverse("dashboard_data"),
        "windows": dashboard_windows(),
        "window": 3600,
    }
    return render(request, "admin/monitoring/dashboard.html", context)


@never_cache
@require_GET
def dashboard_data(request: HttpRequest) -> JsonResponse:
    windows = dict(dashboard_windows())
    try:
        window = int(request.GET.get("window", 3600))
    except ValueError:
        window = 0
    if window not in windows:
        return JsonResponse({"error": f"window must be one of {sorted(windows)} seconds"}, status=400)
    return JsonResponse(selectors.dashboard_data(window=window, now=time.time()))
