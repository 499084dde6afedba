from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from monitoring import views as monitoring_views

urlpatterns = [
    # Staff only, like the rest of the admin (admin_view sends others to its login page).
    path("admin/dashboard/", admin.site.admin_view(monitoring_views.dashboard), name="dashboard"),
    path("admin/dashboard/data", admin.site.admin_view(monitoring_views.dashboard_data), name="dashboard_data"),
    path("admin/", admin.site.urls),
    # Browsers ask for /favicon.ico on pages that name no icon (the admin's).
    path("favicon.ico", RedirectView.as_view(url=static("lobbies/favicon.svg"), permanent=True)),
    path("", include("monitoring.urls")),
    path("", include("lobbies.urls")),
]
