// Landing page: pick a display name, see the open lobbies, join or create one.
'use strict';

(() => {
  const { loadSession, forgetSession, saveLobbyPassword, lastName, normalizeName, api, createSession } =
    window.voicebotSession;
  // Mirrors the server's LOBBY_NAME_PATTERN (Python's Unicode \w plus '-').
  const LOBBY_NAME = /^[\p{L}\p{N}_-]{1,64}$/u;
  const REFRESH_MS = 4000;

  const $ = (id) => document.getElementById(id);
  const nameInput = $('display-name');
  const message = $('landing-message');
  const lobbyList = $('lobby-list');
  const lobbyListStatus = $('lobby-list-status');
  let renderedLobbies = '';

  function showMessage(text) {
    message.textContent = text;
    message.hidden = !text;
  }

  function displayName() {
    return normalizeName(nameInput.value);
  }

  function requireDisplayName() {
    const name = displayName();
    if (!name) {
      showMessage('Enter your name first.');
      nameInput.focus();
    }
    return name;
  }

  function requireLobbyName(input) {
    // The server counts combining marks as no letter, so compose é from e + ◌́ first.
    const name = input.value.trim().normalize('NFC');
    if (!LOBBY_NAME.test(name)) {
      showMessage("Lobby names are 1-64 letters, digits, '-' or '_'.");
      input.focus();
      return '';
    }
    return name;
  }

  // A session's name is fixed when it is made, so a changed name needs a new session.
  async function ensureSession(name) {
    const stored = loadSession();
    if (stored && stored.name === name) return stored;
    return createSession(name);
  }

  function goToLobby(lobbyName) {
    window.location.assign(`/lobby/${encodeURIComponent(lobbyName)}/`);
  }

  async function joinLobby(lobbyName) {
    const name = requireDisplayName();
    if (!name) return;
    showMessage('');
    try {
      await ensureSession(name);
      goToLobby(lobbyName);
    } catch (error) {
      showMessage(error.message);
    }
  }

  async function postLobby(session, lobby) {
    return api('/api/lobbies/', { method: 'POST', body: lobby, token: session.token });
  }

  async function createLobby() {
    const name = requireDisplayName();
    const lobbyName = name && requireLobbyName($('create-name'));
    if (!lobbyName) return;
    const maxParticipants = Number($('create-max').value);
    if (!Number.isInteger(maxParticipants) || maxParticipants < 1) {
      showMessage('Max participants must be a whole number of at least 1.');
      return;
    }
    const lobby = { name: lobbyName, private: $('create-private').checked, max_participants: maxParticipants };
    // Any characters at all, spaces included, so it is sent as typed; an empty field means none.
    const password = $('create-password').value;
    if (password) lobby.password = password;
    showMessage('');
    try {
      let result = await postLobby(await ensureSession(name), lobby);
      if (result.status === 401) {
        // The stored session is gone on the server (e.g. a reset); start a fresh one once.
        forgetSession();
        result = await postLobby(await ensureSession(name), lobby);
      }
      if (!result.ok) throw new Error(result.data.message || 'Could not create the lobby.');
      // The room page finds it there, so the creator joins without typing it again.
      saveLobbyPassword(lobbyName, password);
      goToLobby(lobbyName);
    } catch (error) {
      showMessage(error.message);
    }
  }

  function lobbyItem(lobby) {
    const item = $('lobby-item-template').content.firstElementChild.cloneNode(true);
    const full = lobby.participant_count >= lobby.max_participants;
    item.dataset.lobby = lobby.name;
    item.querySelector('.lobby-name').textContent = lobby.name;
    item.querySelector('.lobby-count').textContent = `${lobby.participant_count} / ${lobby.max_participants}`;
    item.querySelector('.badge-private').hidden = !lobby.private;
    item.querySelector('.badge-password').hidden = !lobby.has_password;
    const button = item.querySelector('.lobby-join');
    button.dataset.lobby = lobby.name;
    button.disabled = full;
    button.textContent = full ? 'Full' : 'Join';
    const label = full ? `${lobby.name} is full` : `Join ${lobby.name}`;
    button.setAttribute('aria-label', lobby.has_password ? `${label} (needs a password)` : label);
    return item;
  }

  function renderLobbies(lobbies) {
    // Re-render only on change, so a refresh never swaps a button out from under a click.
    const snapshot = JSON.stringify(lobbies);
    if (snapshot === renderedLobbies) return;
    renderedLobbies = snapshot;
    lobbyList.replaceChildren(...lobbies.map(lobbyItem));
    lobbyListStatus.textContent = lobbies.length ? '' : 'No lobbies yet. Create one, or join one by name.';
    lobbyListStatus.hidden = lobbies.length > 0;
  }

  async function refreshLobbies() {
    if (document.hidden) return;
    try {
      // The token lets the list include this tab's own private lobbies.
      const session = loadSession();
      const { ok, data } = await api('/api/lobbies/', { token: session && session.token });
      if (!ok) throw new Error(data.message);
      renderLobbies(data.lobbies);
    } catch {
      lobbyListStatus.hidden = false;
      lobbyListStatus.textContent = 'Could not load the lobby list; retrying…';
    }
  }

  function prefillName() {
    const session = loadSession();
    nameInput.value = (session && session.name) || lastName();
  }

  function bindEvents() {
    $('join-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const lobbyName = requireLobbyName($('join-name'));
      if (lobbyName) joinLobby(lobbyName);
    });
    $('create-form').addEventListener('submit', (event) => {
      event.preventDefault();
      createLobby();
    });
    lobbyList.addEventListener('click', (event) => {
      const button = event.target.closest('button.lobby-join');
      if (button && !button.disabled) joinLobby(button.dataset.lobby);
    });
    document.addEventListener('visibilitychange', refreshLobbies);
  }

  prefillName();
  bindEvents();
  refreshLobbies();
  setInterval(refreshLobbies, REFRESH_MS);
})();
