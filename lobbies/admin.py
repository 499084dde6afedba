from django import forms
from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from lobbies import services
from lobbies.models import (
    LOBBY_PASSWORD_MAX_LENGTH,
    ChatMessage,
    Lobby,
    LobbyBan,
    Membership,
    Session,
)
from voicebot.db_router import ChangelistFromReplicaMixin


class MembershipInline(admin.TabularInline):
    model = Membership
    fields = ["session", "state", "muted", "joined_at", "left_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-joined_at"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class LobbyAdminForm(forms.ModelForm):
    """The lobby's fields, plus its password: set or cleared here, never shown."""

    new_password = forms.CharField(
        required=False,
        max_length=LOBBY_PASSWORD_MAX_LENGTH,
        strip=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="People then need it to join. Leave empty to keep the password as it is.",
    )
    clear_password = forms.BooleanField(required=False, help_text="Let anyone join without a password.")

    class Meta:
        model = Lobby
        fields = "__all__"

    def clean(self) -> dict:
        cleaned = super().clean()
        if cleaned.get("new_password") and cleaned.get("clear_password"):
            raise forms.ValidationError("Either set a new password or clear it, not both.")
        return cleaned


class LobbyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("open", "Open"), ("closed", "Closed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Lobby]) -> QuerySet[Lobby]:
        if self.value() in ("open", "closed"):
            return queryset.filter(closed_at__isnull=self.value() == "open")
        return queryset


@admin.register(Lobby)
class LobbyAdmin(ChangelistFromReplicaMixin, admin.ModelAdmin):
    form = LobbyAdminForm
    list_display = [
        "name",
        "participant_count",
        "private",
        "has_password",
        "max_participants",
        "created_by",
        "last_active_at",
        "closed_at",
    ]
    list_filter = [LobbyStatusFilter, "private"]
    search_fields = ["name"]
    # A lobby is closed and reopened with the actions, which also disconnect the people in it.
    readonly_fields = ["created_by", "created_at", "last_active_at", "closed_at", "has_password", "chat"]
    inlines = [MembershipInline]
    actions = ["close_lobbies", "reopen_lobbies"]

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

    @admin.display(description="password", boolean=True)
    def has_password(self, lobby: Lobby) -> bool:
        return lobby.has_password

    @admin.display(description="chat")
    def chat(self, lobby: Lobby) -> str:
        if lobby.pk is None:  # a lobby being added has said nothing yet
            return self.get_empty_value_display()
        url = reverse("admin:lobbies_chatmessage_changelist") + f"?lobby__id__exact={lobby.pk}"
        return format_html('<a href="{}">{} messages</a>', url, lobby.chat_messages.count())

    def save_model(self, request: HttpRequest, lobby: Lobby, form: LobbyAdminForm, change: bool) -> None:
        if form.cleaned_data["clear_password"]:
            lobby.set_password(None)
        elif form.cleaned_data["new_password"]:
            lobby.set_password(form.cleaned_data["new_password"])
        super().save_model(request, lobby, form, change)

    @admin.action(description="Close selected lobbies, disconnecting everyone in them", permissions=["change"])
    def close_lobbies(self, request: HttpRequest, queryset: QuerySet[Lobby]) -> None:
        closed = 0
        for lobby in queryset:
            session_ids = services.lobby_close(lobby_name=lobby.name, by=request.user)
            if session_ids is not None:
                self.log_change(request, lobby, f"Closed the lobby; {len(session_ids)} participant(s) disconnected.")
                closed += 1
        self.message_user(request, f"Closed {closed} of {len(queryset)} selected lobbies; any others were already.")

    @admin.action(description="Reopen selected lobbies", permissions=["change"])
    def reopen_lobbies(self, request: HttpRequest, queryset: QuerySet[Lobby]) -> None:
        reopened = 0
        for lobby in queryset:
            if services.lobby_reopen(lobby_name=lobby.name, by=request.user):
                self.log_change(request, lobby, "Reopened the lobby.")
                reopened += 1
        self.message_user(request, f"Reopened {reopened} of {len(queryset)} selected lobbies; any others were open.")


@admin.register(Session)
class SessionAdmin(ChangelistFromReplicaMixin, admin.ModelAdmin):
    list_display = ["name", "id", "is_bot", "lobbies_now", "created_at", "last_seen_at"]
    list_filter = ["is_bot"]
    search_fields = ["name", "=id"]
    readonly_fields = ["id", "created_at", "last_seen_at"]
    inlines = [MembershipInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Session]:
        live = Count("memberships", filter=Q(memberships__left_at__isnull=True))
        return super().get_queryset(request).annotate(live_count=live)

    @admin.display(description="in lobbies now", ordering="live_count")
    def lobbies_now(self, session: Session) -> int:
        return session.live_count


@admin.register(Membership)
class MembershipAdmin(ChangelistFromReplicaMixin, admin.ModelAdmin):
    """Who was in which lobby, and when; the live ones can be kicked or muted."""

    list_display = ["session", "lobby", "state", "muted", "joined_at", "left_at"]
    list_filter = ["state", "muted", "joined_at", "left_at", ("lobby", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["session__name", "lobby__name", "=session__id"]
    date_hierarchy = "joined_at"
    list_select_related = ["session", "lobby"]
    ordering = ["-joined_at"]
    actions = ["kick", "mute"]

    # History is a record: it is read, not written, here.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Membership | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Membership | None = None) -> bool:
        return False

    def has_moderate_permission(self, request: HttpRequest) -> bool:
        """Kicking and muting change who is in a lobby: it takes the right to change lobbies."""
        return request.user.has_perm("lobbies.change_lobby")

    @admin.action(description="Kick selected participants out of their lobby", permissions=["moderate"])
    def kick(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        kicked = 0
        for membership in queryset:
            ban = services.membership_kick(membership_id=membership.pk, by=request.user)
            if ban is not None:
                until = f"{ban.until:%Y-%m-%d %H:%M:%S} UTC"
                self.log_change(request, membership, f"Kicked out of {membership.lobby}; may not rejoin it before {until}.")
                kicked += 1
        self.message_user(request, f"Kicked {kicked} of {len(queryset)} selected; any others had left already.")

    @admin.action(description="Mute selected participants", permissions=["moderate"])
    def mute(self, request: HttpRequest, queryset: QuerySet[Membership]) -> None:
        muted = 0
        for membership in queryset:
            if services.membership_mute(membership_id=membership.pk, by=request.user):
                self.log_change(request, membership, f"Muted in {membership.lobby}.")
                muted += 1
        self.message_user(request, f"Muted {muted} of {len(queryset)} selected; any others had left already.")


@admin.register(LobbyBan)
class LobbyBanAdmin(ChangelistFromReplicaMixin, admin.ModelAdmin):
    """Bans are made by kicking someone; deleting one lets that session back in at once."""

    list_display = ["session", "lobby", "until", "created_by", "created_at"]
    list_filter = ["until", ("lobby", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["session__name", "lobby__name", "=session__id"]
    list_select_related = ["session", "lobby", "created_by"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: LobbyBan | None = None) -> bool:
        return False


@admin.register(ChatMessage)
class ChatMessageAdmin(ChangelistFromReplicaMixin, admin.ModelAdmin):
    """What was said in each lobby, as its members saw it: read here, never written."""

    list_display = ["created_at", "lobby", "author_name", "text"]
    list_filter = [("lobby", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["text", "author_name", "lobby__name", "=session__id"]
    date_hierarchy = "created_at"
    list_select_related = ["lobby"]
    ordering = ["-id"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ChatMessage | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ChatMessage | None = None) -> bool:
        return False
