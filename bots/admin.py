from collections.abc import Callable

from django import forms
from django.contrib import admin, messages
from django.db import models
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from bots import selectors, services
from bots.models import Assignment, Bot, Provider, Turn, Worker
from lobbies.admin import LobbyAdmin
from lobbies.models import Lobby


def milliseconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    """Where a provider's API key is read from; the key itself is never stored or shown."""

    list_display = ["name", "kind", "base_url", "key_source", "timeout_seconds", "max_retries"]
    # A base URL typed without a scheme is taken as https://.
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    list_filter = ["kind"]
    search_fields = ["name", "base_url"]

    @admin.display(description="API key")
    def key_source(self, provider: Provider) -> str:
        if provider.api_key_env:
            where = f"environment variable {provider.api_key_env}"
        elif provider.api_key_file:
            where = f"file {provider.api_key_file}"
        else:
            return "none"
        # Whether the key is there is read on this machine; workers read their own.
        return f"{where} ({'found' if provider.api_key() else 'not found'} here)"


class AddToLobbyForm(forms.Form):
    lobby = forms.ModelChoiceField(queryset=Lobby.objects.filter(closed_at__isnull=True).order_by("name"))


@admin.register(Bot)
class BotAdmin(admin.ModelAdmin):
    list_display = ["name", "enabled", "provider", "model_name", "lobbies_now", "turn_count", "max_lobbies"]
    list_filter = ["enabled", "provider"]
    search_fields = ["name", "model_name"]
    readonly_fields = ["analytics", "created_at"]
    fieldsets = [
        (None, {"fields": ["name", "enabled", "provider", "model_name", "system_prompt", "greeting"]}),
        ("Speech", {"fields": ["speech_provider", "voice", "language"]}),
        (
            "Limits",
            {"fields": ["max_lobbies", "temperature", "max_reply_tokens", "max_reply_chars", "context_turns", "cache_seconds"]},
        ),
        ("Analytics", {"fields": ["analytics", "created_at"]}),
    ]
    actions = ["add_to_lobby"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Bot]:
        live = Count("assignments", filter=Q(assignments__removed_at__isnull=True), distinct=True)
        return super().get_queryset(request).select_related("provider").annotate(live_count=live)

    @admin.display(description="in lobbies now", ordering="live_count")
    def lobbies_now(self, bot: Bot) -> int:
        return bot.live_count

    @admin.display(description="turns")
    def turn_count(self, bot: Bot) -> int:
        return bot.turns.count()

    @admin.display(description="analytics")
    def analytics(self, bot: Bot) -> str:
        if bot.pk is None:
            return "–"
        figures = selectors.bot_analytics(bot=bot)
        return format_html(
            "{} turns, {} with errors, {} interrupted. End of speech to first bot audio: "
            "average {}, p95 {}. <a href='{}'>Conversation history</a>",
            figures["turns"],
            figures["errors"],
            figures["interrupted"],
            milliseconds(figures["first_audio_avg_ms"]),
            milliseconds(figures["first_audio_p95_ms"]),
            reverse("admin:bots_turn_changelist") + f"?bot__id__exact={bot.pk}",
        )

    def save_model(self, request: HttpRequest, bot: Bot, form: forms.ModelForm, change: bool) -> None:
        super().save_model(request, bot, form, change)
        # Disabling makes the bot leave, enabling lets it come back, now rather than at the next heartbeat.
        services.notify_workers()

    @admin.action(description="Add selected bots to a lobby…", permissions=["change"])
    def add_to_lobby(self, request: HttpRequest, queryset: QuerySet[Bot]) -> HttpResponse | None:
        form = AddToLobbyForm(request.POST if "lobby" in request.POST else None)
        if not form.is_valid():
            context = {
                **self.admin_site.each_context(request),
                "title": "Add bots to a lobby",
                "bots": queryset,
                "form": form,
                "opts": self.model._meta,
                "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/bots/add_to_lobby.html", context)
        lobby = form.cleaned_data["lobby"]
        for bot in queryset:
            try:
                services.bot_add_to_lobby(bot=bot, lobby=lobby, by=request.user)
            except services.BotUnavailable as error:
                self.message_user(request, str(error), messages.WARNING)
                continue
            self.log_change(request, bot, f"Added to lobby {lobby.name}.")
            self.message_user(request, f"{bot.name} is joining {lobby.name}.")
        return None


class AssignmentForm(forms.ModelForm):
    class Meta:
        model = Assignment
        fields = ["bot", "lobby"]


class LiveFilter(admin.SimpleListFilter):
    title = "presence"
    parameter_name = "live"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "In the lobby"), ("no", "Removed")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Assignment]) -> QuerySet[Assignment]:
        if self.value() in ("yes", "no"):
            return queryset.filter(removed_at__isnull=self.value() == "yes")
        return queryset


@admin.register(Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    """A bot in a lobby. Added here or from the bot list; removed and restarted with the actions."""

    form = AssignmentForm
    list_display = ["bot", "lobby", "status", "status_since", "short_error", "worker", "created_at", "removed_at"]
    list_filter = [LiveFilter, "status", ("bot", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["bot__name", "lobby__name"]
    list_select_related = ["bot", "lobby", "worker"]
    actions = ["remove_from_lobby", "restart"]
    readonly_fields = ["bot", "lobby", "status", "status_since", "last_error", "worker", "claimed_at", "added_by", "created_at", "removed_at"]

    def get_readonly_fields(self, request: HttpRequest, obj: Assignment | None = None) -> list[str]:
        # The add form chooses the bot and lobby; afterwards everything is the worker's record.
        return [] if obj is None else self.readonly_fields

    def get_fields(self, request: HttpRequest, obj: Assignment | None = None) -> list[str]:
        return ["bot", "lobby"] if obj is None else self.readonly_fields

    def has_delete_permission(self, request: HttpRequest, obj: Assignment | None = None) -> bool:
        # Removing is an action that makes the bot leave; history stays.
        return False

    @admin.display(description="last error")
    def short_error(self, assignment: Assignment) -> str:
        return assignment.last_error[:80] if assignment.status == Assignment.Status.ERROR else ""

    def save_model(self, request: HttpRequest, obj: Assignment, form: forms.ModelForm, change: bool) -> None:
        if change:
            return
        try:
            created = services.bot_add_to_lobby(bot=obj.bot, lobby=obj.lobby, by=request.user)
        except services.BotUnavailable as error:
            # Shown instead of the default success message (see response_add).
            request.bot_unavailable = str(error)
            return
        obj.pk = created.pk

    def response_add(self, request: HttpRequest, obj: Assignment, post_url_continue: str | None = None) -> HttpResponse:
        if getattr(request, "bot_unavailable", None):
            self.message_user(request, request.bot_unavailable, messages.ERROR)
            return self.response_post_save_add(request, obj)
        return super().response_add(request, obj, post_url_continue)

    def log_addition(self, request: HttpRequest, obj: Assignment, message: object) -> None:
        if obj.pk is not None:
            super().log_addition(request, obj, message)

    @admin.action(description="Remove selected bots from their lobby", permissions=["change"])
    def remove_from_lobby(self, request: HttpRequest, queryset: QuerySet[Assignment]) -> None:
        done, selected = self.act(request, queryset, services.bot_remove_from_lobby, "Removed from the lobby.")
        self.message_user(request, f"Removed {done} of {selected} selected; any others had been removed already.")

    @admin.action(description="Restart selected bots", permissions=["change"])
    def restart(self, request: HttpRequest, queryset: QuerySet[Assignment]) -> None:
        done, selected = self.act(request, queryset, services.bot_restart, "Restarted.")
        self.message_user(request, f"Restarted {done} of {selected} selected; any others had been removed.")

    def act(
        self, request: HttpRequest, queryset: QuerySet[Assignment], service: Callable[..., bool], log: str
    ) -> tuple[int, int]:
        """Apply `service` to each selected assignment; returns how many it changed, of how many."""
        # Read once, before acting: the changelist's filter (presence, status) would no longer match the rows.
        selected = list(queryset.select_related("bot", "lobby"))
        done = 0
        for assignment in selected:
            if service(assignment=assignment, by=request.user):
                self.log_change(request, assignment, log)
                done += 1
        return done, len(selected)


class LobbyAssignmentInline(admin.TabularInline):
    model = Assignment
    verbose_name_plural = "bots in this lobby"
    fields = ["bot", "status", "status_since", "last_error", "worker"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def get_queryset(self, request: HttpRequest) -> QuerySet[Assignment]:
        return super().get_queryset(request).filter(removed_at__isnull=True).select_related("bot", "worker")

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class LobbyWithBotsAdmin(LobbyAdmin):
    """The lobby admin, also showing the bots in the lobby."""

    inlines = [*LobbyAdmin.inlines, LobbyAssignmentInline]


admin.site.unregister(Lobby)
admin.site.register(Lobby, LobbyWithBotsAdmin)


@admin.register(Turn)
class TurnAdmin(admin.ModelAdmin):
    """Conversation history: read here, deleted by retention (BOT_HISTORY_RETENTION_DAYS)."""

    list_display = ["created_at", "bot", "lobby", "source", "speaker_name", "user_text", "reply_text", "first_audio", "error"]
    list_filter = ["source", "interrupted", ("bot", admin.RelatedOnlyFieldListFilter), ("lobby", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["user_text", "reply_text", "speaker_name"]
    date_hierarchy = "created_at"
    list_select_related = ["bot", "lobby"]

    @admin.display(description="to first audio", ordering="first_audio_ms")
    def first_audio(self, turn: Turn) -> str:
        return milliseconds(turn.first_audio_ms)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Turn | None = None) -> bool:
        return False


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ["name", "hostname", "pid", "capacity", "bots_now", "started_at", "heartbeat_at", "stopped_at"]
    readonly_fields = ["name", "hostname", "pid", "capacity", "started_at", "heartbeat_at", "stopped_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Worker]:
        live = Count("assignments", filter=Q(assignments__removed_at__isnull=True))
        return super().get_queryset(request).annotate(live_count=live)

    @admin.display(description="bots now", ordering="live_count")
    def bots_now(self, worker: Worker) -> int:
        return worker.live_count

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Worker | None = None) -> bool:
        return False
