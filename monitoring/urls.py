from django.urls import path

from monitoring import metrics, views

urlpatterns = [
    path("healthz", views.liveness, name="healthz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("readyz", views.readiness, name="readyz"),
    path("health/", views.health_page, name="health"),
]
