from django.contrib import admin
from django.urls import include, path

from monitoring import views as monitoring_views

urlpatterns = [
    # Staff only, like the rest of the admin (admin_view sends others to its login page).
    path("admin/dashboard/", admin.site.admin_view(monitoring_views.dashboard), name="dashboard"),
    path("admin/dashboard/data", admin.site.admin_view(monitoring_views.dashboard_data), name="dashboard_data"),
    path("admin/", admin.site.urls),
    path("", include("monitoring.urls")),
    path("", include("lobbies.urls")),
]
