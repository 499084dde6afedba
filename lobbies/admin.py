from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest

from lobbies.models import Lobby, Membership, Session


class MembershipInline(admin.TabularInline):
    model = Membership
    fields = ["session", "state", "muted", "joined_at", "left_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-joined_at"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Lobby)
class LobbyAdmin(admin.ModelAdmin):
    list_display = ["name", "participant_count", "private", "max_participants", "created_by", "last_active_at"]
    list_filter = ["private"]
    search_fields = ["name"]
    readonly_fields = ["created_by", "created_at", "last_active_at"]
    inlines = [MembershipInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Lobby]:
        return (
            super()
            .get_queryset(request)
            .select_related("created_by")
            .annotate(live_count=Count("memberships", filter=Q(memberships__left_at__isnull=True)))
        )

    @admin.display(description="participants", ordering="live_count")
    def participant_count(self, lobby: Lobby) -> int:
        return lobby.live_count


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ["name", "id", "is_bot", "created_at", "last_seen_at"]
    list_filter = ["is_bot"]
    search_fields = ["name", "=id"]
    readonly_fields = ["id", "created_at", "last_seen_at"]
    inlines = [MembershipInline]
