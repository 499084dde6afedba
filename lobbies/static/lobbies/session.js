// Shared by the landing and room pages (loaded before either): this tab's
// session and the JSON API. Exposes one global, window.voicebotSession.
'use strict';

(() => {
  // The session lives per tab so two tabs can be two people; the last name is
  // kept per browser only to prefill the name field.
  const SESSION_KEY = 'voicebot.session';
  const NAME_KEY = 'voicebot.name';
  // A lobby's password is kept per tab too, so a reconnect or a reload reuses it.
  const PASSWORD_KEY = 'voicebot.password.';

  function loadSession() {
    try {
      const session = JSON.parse(sessionStorage.getItem(SESSION_KEY));
      return session && typeof session.token === 'string' ? session : null;
    } catch {
      return null;
    }
  }

  function forgetSession() {
    sessionStorage.removeItem(SESSION_KEY);
  }

  function loadLobbyPassword(lobbyName) {
    return sessionStorage.getItem(PASSWORD_KEY + lobbyName) || '';
  }

  // An empty password forgets the one stored.
  function saveLobbyPassword(lobbyName, password) {
    if (password) {
      sessionStorage.setItem(PASSWORD_KEY + lobbyName, password);
    } else {
      sessionStorage.removeItem(PASSWORD_KEY + lobbyName);
    }
  }

  function lastName() {
    return localStorage.getItem(NAME_KEY) || '';
  }

  // Collapses runs of whitespace the way the server does.
  function normalizeName(value) {
    return value.split(/\s+/).filter(Boolean).join(' ');
  }

  // The server only takes JSON bodies marked as such, so everything but a
  // GET or HEAD carries Content-Type: application/json and a body ('{}' at least).
  async function api(path, { method = 'GET', body, token } = {}) {
    const headers = { Accept: 'application/json' };
    const hasBody = method !== 'GET' && method !== 'HEAD';
    if (hasBody) headers['Content-Type'] = 'application/json';
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, {
      method,
      headers,
      body: hasBody ? JSON.stringify(body === undefined ? {} : body) : undefined,
      credentials: 'same-origin',
    });
    const data = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, data };
  }

  // Starts a new session under this name and makes it this tab's.
  async function createSession(name) {
    const { ok, data } = await api('/api/sessions/', { method: 'POST', body: { name } });
    if (!ok) throw new Error(data.message || 'Could not start a session.');
    const session = { id: data.id, name: data.name, token: data.token };
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
    localStorage.setItem(NAME_KEY, session.name);
    return session;
  }

  window.voicebotSession = Object.freeze({
    loadSession,
    forgetSession,
    loadLobbyPassword,
    saveLobbyPassword,
    lastName,
    normalizeName,
    api,
    createSession,
  });
})();
