// Room page: signaling over the lobby WebSocket, audio over a mesh of
// RTCPeerConnections (one per peer), and a text chat beside it.
'use strict';

(() => {
  const {
    loadSession,
    forgetSession,
    loadLobbyPassword,
    saveLobbyPassword,
    lastName,
    normalizeName,
    api,
    createSession,
  } = window.voicebotSession;
  // Keeps proxies and load balancers from closing a quiet socket.
  const PING_MS = 25000;
  // A ping with no frame at all back within this time means a dead connection.
  const PONG_TIMEOUT_MS = 10000;
  // From opening the socket to the welcome; longer means the server is not answering.
  const HANDSHAKE_TIMEOUT_MS = 10000;
  // Reconnection backoff: full jitter, a random wait between 0 and a cap that
  // doubles from RECONNECT_BASE_MS with every failed attempt, up to RECONNECT_MAX_MS.
  const RECONNECT_BASE_MS = 500;
  const RECONNECT_MAX_MS = 15000;
  // The offering side rebuilds a connection that is not up this long after its
  // offer (the offer or its answer was lost), or that failed; the wait doubles
  // with every rebuild in a row, up to OFFER_RETRY_MAX_MS.
  const OFFER_RETRY_MS = 10000;
  const OFFER_RETRY_MAX_MS = 60000;
  // Our own close that says we are gone for good; any other close is a drop.
  const CLOSE_LEAVING = 1000;
  // Our own close of a socket that stopped answering: we mean to come back.
  const CLOSE_STALE = 4000;
  const METER_MS = 100;
  const SPEAKING_RMS = 0.02;
  // Speech has short gaps; holding the indicator keeps it from flickering.
  const SPEAKING_HOLD_MS = 300;
  // How long a passing notice (e.g. a message that could not be delivered) stays up.
  const NOTICE_MS = 6000;
  const CLOSE_REASONS = {
    4008: 'An administrator removed you from this lobby.',
    4400: 'This lobby name is not valid.',
    4401: 'Your session is no longer valid.',
    4403: 'The lobby is full.',
    4409: 'You joined this lobby from another tab or window.',
    4410: 'An administrator closed this lobby.',
  };
  const CLOSE_SESSION_INVALID = 4401;
  // The error sent before each of these closes; for any other, its own message is shown.
  const CLOSE_ERRORS = {
    4008: 'kicked',
    4400: 'bad_field',
    4401: 'unauthenticated',
    4403: 'lobby_full',
    4409: 'replaced',
    4410: 'lobby_closed',
  };
  // Errors whose own message says more than ours: a kick's says when one may come back.
  const SERVER_WORDED_ERRORS = new Set(['kicked']);
  // A 4403 after this error asks for the lobby's password; after any other it is final.
  const CLOSE_BAD_PASSWORD = 4403;

  // The server's 44xx closes mirror HTTP 4xx answers: trying again would get
  // the same. 4008 (like 1008, policy) is one too. Every other close is a drop.
  function isFinalClose(code) {
    return (code >= 4400 && code <= 4499) || code === 4008;
  }

  const $ = (id) => document.getElementById(id);
  const lobbyName = $('room').dataset.lobbyName;

  const state = {
    session: null,
    socket: null,
    selfId: null,
    iceServers: [],
    localStream: null,
    muted: false,
    // The values of our own mute frames whose peer_updated has not come back yet,
    // oldest first: any other news of our mute is the server's (an administrator's).
    muteEchoes: [],
    // The lobby password the current socket was opened with ('' for none).
    sentPassword: '',
    leaving: false,
    // Why we closed the socket ourselves for good, shown instead of "connection lost".
    closeReason: '',
    // 'connecting' | 'connected' | 'reconnecting' | 'disconnected', as shown in the status.
    connection: 'connecting',
    welcomes: 0, // welcomes received on this page; more than one means resumed
    reconnectAttempt: 0, // attempts since the last welcome
    reconnectTimer: null,
    handshakeTimer: null,
    lastFrameAt: 0,
    lastClose: null, // {code, reason} of the last socket close
    lastError: null, // the last error frame, which explains a close that follows it
    statusLog: [], // recent status changes, for the browser test
    linkSerial: 0,
    offerRetryMs: new Map(), // peer_id -> wait before the next rebuild, while not connected
    pingTimer: null,
    noticeTimer: null,
    participants: new Map(), // peer_id -> {peer_id, name, bot, muted, state}, oneself included
    links: new Map(), // peer_id -> {peerId, serial, pc, pendingCandidates, queue, audio, closed}
    meters: new Map(), // peer_id -> {source, analyser, samples, loudUntil}
    // The newest chat id shown (or, before any, the room's at our first
    // welcome); after a resume, what came after it is fetched with chat_history.
    lastChatId: null,
    chatIds: new Set(), // ids of the chat messages shown, so none is shown twice
  };
  let audioContext = null;

  // Read by the browser test.
  window.voicebotRoom = {
    get selfId() {
      return state.selfId;
    },
    get peers() {
      return new Map([...state.links].map(([peerId, link]) => [peerId, link.pc]));
    },
    // Every peer connection gets a new serial, so a rebuilt one can be told from the old.
    get links() {
      return [...state.links.values()].map(({ peerId, serial, pc }) => ({ peerId, serial, pc }));
    },
    get participants() {
      return [...state.participants.values()].map((peer) => ({ ...peer }));
    },
    get connection() {
      return state.connection;
    },
    get socketState() {
      return state.socket ? ['connecting', 'open', 'closing', 'closed'][state.socket.readyState] : 'none';
    },
    get reconnectAttempts() {
      return state.reconnectAttempt;
    },
    get welcomes() {
      return state.welcomes;
    },
    get lastClose() {
      return state.lastClose && { ...state.lastClose };
    },
    get statusLog() {
      return state.statusLog.map((entry) => ({ ...entry }));
    },
    get muted() {
      return state.muted;
    },
    get muteEchoesPending() {
      return state.muteEchoes.length;
    },
    // Whether the microphone track sends sound (null without a microphone).
    get micEnabled() {
      const track = state.localStream && state.localStream.getAudioTracks()[0];
      return track ? track.enabled : null;
    },
  };

  // --- Identity -------------------------------------------------------------

  // The WebSocket authenticates by cookie, and the cookie is per browser, not
  // per tab: point it at this tab's session right before every handshake.
  async function resumeSession(session) {
    const { ok, status } = await api('/api/sessions/resume/', { method: 'POST', token: session.token });
    if (status === 401) return false;
    if (!ok) throw new Error(`The server answered ${status}.`);
    return true;
  }

  function askForName() {
    const step = $('name-step');
    const form = $('name-form');
    const input = $('name-input');
    const message = $('name-message');
    $('room-ui').hidden = true;
    step.hidden = false;
    setStatus('connecting', 'Not joined yet');
    input.value = lastName();
    input.focus();
    return new Promise((resolve) => {
      async function onSubmit(event) {
        event.preventDefault();
        const name = normalizeName(input.value);
        if (!name) return;
        form.querySelector('button').disabled = true;
        try {
          const session = await createSession(name);
          form.removeEventListener('submit', onSubmit);
          step.hidden = true;
          resolve(session);
        } catch (error) {
          message.textContent = error.message;
          message.hidden = false;
        } finally {
          form.querySelector('button').disabled = false;
        }
      }
      form.addEventListener('submit', onSubmit);
    });
  }

  // Resolves with the password typed; `note` says why it is asked again, if it is.
  function askForPassword(note) {
    const step = $('password-step');
    const form = $('password-form');
    const input = $('password-input');
    const message = $('password-message');
    $('room-ui').hidden = true;
    $('rejoin-button').hidden = true;
    step.hidden = false;
    setStatus('connecting', 'Password needed');
    message.textContent = note;
    message.hidden = !note;
    input.value = '';
    input.focus();
    return new Promise((resolve) => {
      function onSubmit(event) {
        event.preventDefault();
        const password = input.value;
        if (!password) return;
        form.removeEventListener('submit', onSubmit);
        step.hidden = true;
        resolve(password);
      }
      form.addEventListener('submit', onSubmit);
    });
  }

  // The server refused our password (or its absence): forget it, ask, and join with the new one.
  async function onBadPassword() {
    const wrong = state.sentPassword !== '';
    saveLobbyPassword(lobbyName, '');
    leaveRoomState();
    const password = await askForPassword(wrong ? 'That password is wrong. Try again.' : '');
    if (state.leaving) return;
    saveLobbyPassword(lobbyName, password);
    $('room-ui').hidden = false;
    join();
  }

  // --- Page state -----------------------------------------------------------

  function setStatus(connection, text) {
    const status = $('connection-status');
    status.dataset.state = connection;
    status.textContent = text;
    state.connection = connection;
    // While reconnecting, the participants and chat stay on screen, greyed: they may be out of date.
    $('room-ui').classList.toggle('stale', connection === 'reconnecting');
    state.statusLog.push({ state: connection, text, at: Date.now() });
    if (state.statusLog.length > 100) state.statusLog.shift();
  }

  function showDisconnected(reason) {
    // A passing note about the room we were in would only confuse the reason.
    hideNotice();
    setStatus('disconnected', `Disconnected. ${reason}`);
    $('rejoin-button').hidden = false;
  }

  // A passing note under the connection status; it never changes the connection state.
  function showNotice(text) {
    const notice = $('room-notice');
    notice.textContent = text;
    notice.hidden = false;
    clearTimeout(state.noticeTimer);
    state.noticeTimer = setTimeout(hideNotice, NOTICE_MS);
  }

  function hideNotice() {
    clearTimeout(state.noticeTimer);
    const notice = $('room-notice');
    notice.hidden = true;
    notice.textContent = '';
  }

  function setChatEnabled(enabled) {
    $('chat-input').disabled = !enabled;
    $('chat-send').disabled = !enabled;
  }

  function findParticipantItem(peerId) {
    return $('participants').querySelector(`[data-peer-id="${CSS.escape(peerId)}"]`);
  }

  function participantItem(peerId) {
    let item = findParticipantItem(peerId);
    if (!item) {
      item = $('participant-template').content.firstElementChild.cloneNode(true);
      item.dataset.peerId = peerId;
      $('participants').append(item);
    }
    return item;
  }

  // A server that predates resume sends no state: everyone it lists is connected.
  function peerState(peer) {
    return peer && peer.state === 'reconnecting' ? 'reconnecting' : 'connected';
  }

  function showParticipant(peer) {
    peer = { ...peer, state: peerState(peer) };
    state.participants.set(peer.peer_id, peer);
    const item = participantItem(peer.peer_id);
    const isSelf = peer.peer_id === state.selfId;
    item.classList.toggle('self', isSelf);
    item.dataset.muted = String(peer.muted);
    item.dataset.state = peer.state;
    item.querySelector('.participant-name').textContent = peer.name;
    item.querySelector('.badge-you').hidden = !isSelf;
    item.querySelector('.badge-bot').hidden = !peer.bot;
    item.querySelector('.badge-muted').hidden = !peer.muted;
    item.querySelector('.badge-reconnecting').hidden = peer.state !== 'reconnecting';
    if (isSelf) showPeerState(peer.peer_id, state.localStream ? '' : 'listen-only');
  }

  function showPeerState(peerId, connectionState) {
    const item = findParticipantItem(peerId);
    if (!item) return;
    item.dataset.connection = connectionState;
    item.querySelector('.peer-state').textContent = connectionState;
  }

  function showSpeaking(peerId, speaking) {
    const item = findParticipantItem(peerId);
    if (item) item.classList.toggle('speaking', speaking);
  }

  // --- Signaling socket -----------------------------------------------------

  function send(frame) {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify(frame));
    }
  }

  // A first join, or a rejoin after a close that ended the stay (the Rejoin button).
  function join() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    state.reconnectAttempt = 0;
    $('rejoin-button').hidden = true;
    setStatus('connecting', 'Connecting…');
    connect();
  }

  // One attempt: point the cookie at this tab's session, then open the socket.
  async function connect() {
    let known;
    try {
      known = await resumeSession(state.session);
    } catch {
      // The server is not answering (restarting, or the network is gone): try again later.
      if (!state.leaving) scheduleReconnect();
      return;
    }
    if (state.leaving) return;
    if (known) {
      openSocket();
    } else {
      await startOver();
    }
  }

  // The server no longer knows this tab's session: ask for a name and start a new one.
  async function startOver() {
    leaveRoomState();
    forgetSession();
    state.session = await askForName();
    $('room-ui').hidden = false;
    join();
  }

  function scheduleReconnect() {
    clearTimeout(state.reconnectTimer);
    state.reconnectAttempt += 1;
    const cap = Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * 2 ** (state.reconnectAttempt - 1));
    const delay = Math.random() * cap;
    if (state.welcomes > 0) {
      setStatus('reconnecting', `Reconnecting… (attempt ${state.reconnectAttempt})`);
    } else {
      setStatus('connecting', `Connecting… (attempt ${state.reconnectAttempt})`);
    }
    state.reconnectTimer = setTimeout(() => {
      state.reconnectTimer = null;
      connect();
    }, delay);
  }

  // Back online: waiting out the backoff would only delay the return.
  function reconnectNow() {
    if (state.reconnectTimer === null || state.leaving) return;
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    connect();
  }

  function openSocket() {
    const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    // Sent on every attempt, also on a resume, which does not need it (the server ignores it then).
    const password = loadLobbyPassword(lobbyName);
    const query = password ? `?password=${encodeURIComponent(password)}` : '';
    const socket = new WebSocket(`${scheme}${location.host}/ws/lobby/${encodeURIComponent(lobbyName)}/${query}`);
    state.socket = socket;
    state.sentPassword = password;
    state.closeReason = '';
    state.lastError = null;
    state.handshakeTimer = setTimeout(() => dropSocket(socket), HANDSHAKE_TIMEOUT_MS);
    // A socket we gave up on may still fire; only the current one counts.
    socket.addEventListener('message', (event) => {
      if (state.socket !== socket) return;
      state.lastFrameAt = performance.now();
      handleFrame(JSON.parse(event.data));
    });
    socket.addEventListener('close', (event) => {
      if (state.socket === socket) onSocketClosed(event.code, event.reason);
    });
  }

  // Give up on a socket that stopped answering without waiting for its close,
  // which may take minutes on a dead network. The close code says we come back.
  function dropSocket(socket) {
    if (state.socket !== socket) return;
    socket.close(CLOSE_STALE, 'no answer');
    onSocketClosed(CLOSE_STALE, 'no answer');
  }

  function sendPing(socket) {
    const sentAt = performance.now();
    send({ type: 'ping' });
    setTimeout(() => {
      if (state.lastFrameAt < sentAt) dropSocket(socket);
    }, PONG_TIMEOUT_MS);
  }

  function handleFrame(frame) {
    const handler = frameHandlers[frame.type];
    if (handler) handler(frame);
  }

  const frameHandlers = {
    welcome: onWelcome,
    peer_joined: (frame) => onPeerJoined(frame.peer),
    peer_left: (frame) => removePeer(frame.peer_id),
    peer_updated: (frame) => onPeerUpdated(frame.peer),
    offer: (frame) => onOffer(frame.from, frame.sdp),
    answer: (frame) => signal(frame.from, (link) => acceptAnswer(link, frame.sdp)),
    ice: (frame) => signal(frame.from, (link) => addRemoteCandidate(link, frame.candidate)),
    chat: showChat,
    chat_history: onChatHistory,
    error: onServerError,
  };

  // The first welcome, or a fresh one after a reconnect: in both cases every
  // peer connection starts afresh, and of each pair the smaller peer id offers.
  function onWelcome(frame) {
    clearTimeout(state.handshakeTimer);
    if (frame.peer_id !== state.session.id) {
      // Another tab resumed its own session between our resume and this
      // handshake, so the cookie named someone else: do not speak as them.
      state.closeReason = 'Another tab signed in at the same moment; rejoin to try again.';
      state.socket.close(CLOSE_LEAVING);
      return;
    }
    state.welcomes += 1;
    state.reconnectAttempt = 0;
    catchUpChat(frame.last_chat_id);
    state.selfId = frame.peer_id;
    state.iceServers = frame.ice_servers || [];
    // Whoever left while we were away is gone; the others are shown as the server sees them now.
    const present = new Set([state.selfId, ...frame.peers.map((peer) => peer.peer_id)]);
    for (const peerId of [...state.participants.keys()]) {
      if (!present.has(peerId)) removePeer(peerId);
    }
    for (const peerId of [...state.links.keys()]) closeLink(peerId);
    const resumedHere = state.welcomes > 1;
    // Echoes of frames sent on an earlier socket never come on this one.
    state.muteEchoes = [];
    showParticipant({ peer_id: frame.peer_id, name: frame.name, bot: false, muted: state.muted, state: 'connected' });
    agreeOnMute(frame.muted, resumedHere);
    if (state.localStream) startMeter(state.selfId, state.localStream);
    for (const peer of frame.peers) {
      showParticipant(peer);
      if (shouldOffer(peer)) offerTo(peer.peer_id);
    }
    setStatus('connected', 'Connected');
    setChatEnabled(true);
    clearInterval(state.pingTimer);
    const socket = state.socket;
    state.pingTimer = setInterval(() => sendPing(socket), PING_MS);
  }

  // Errors that end the connection are explained by the close code. The others
  // concern one message only, so nothing is torn down.
  function onServerError(frame) {
    state.lastError = frame;
    console.warn(`voicebot: server error ${frame.code}: ${frame.message}`);
    if (frame.code === 'delivery_failed') {
      // The addressed peer's inbox is full for the moment. The error does not say
      // which peer, so there is nothing to retry; the note explains a silent link.
      showNotice("A message to another participant couldn't be delivered; if you can't hear someone, rejoin.");
    } else if (frame.code === 'chat_failed') {
      showNotice("Your last chat message couldn't be sent; send it again.");
    }
  }

  // Glare-free rule: of each pair, the smaller peer id makes the offer. A peer
  // that is reconnecting cannot take one; it gets ours when it is back.
  function shouldOffer(peer) {
    return state.selfId < peer.peer_id && peerState(peer) === 'connected';
  }

  // A peer_joined for a peer we already have a connection to changes nothing
  // (a peer that really came back is announced by peer_left first).
  function onPeerJoined(peer) {
    showParticipant(peer);
    if (shouldOffer(peer) && !state.links.has(peer.peer_id)) offerTo(peer.peer_id);
  }

  // The welcome says whether our place in the lobby is muted (a server that
  // predates this says nothing). A muted place mutes us here too, without a
  // word back: we muted it before a reload, or an administrator did while we
  // were away. A place that is not muted while we are is told so.
  function agreeOnMute(placeMuted, resumedHere) {
    if (typeof placeMuted !== 'boolean') {
      tellMuted(state.muted);
    } else if (placeMuted && !state.muted) {
      applyMuted(true);
      showNotice(resumedHere ? 'An administrator muted you.' : 'You are still muted.');
    } else if (!placeMuted && state.muted) {
      tellMuted(true);
    }
  }

  // News of our own mute: the echo of one of our mute frames, or the server's
  // own word (an administrator muted us).
  function onSelfUpdated(peer) {
    const echo = state.muteEchoes.indexOf(peer.muted);
    if (echo !== -1) {
      // Ours. A frame that changed nothing on the server has no echo, so any
      // older ones still waiting go too. The page already shows our latest
      // choice, so a quick mute-unmute does not flicker.
      state.muteEchoes.splice(0, echo + 1);
    } else if (peer.muted && !state.muted) {
      // An administrator muted us. The server has it already: no mute frame back.
      applyMuted(true);
      showNotice('An administrator muted you.');
    } else if (!peer.muted && state.muted) {
      // The server lost our mute somehow; our microphone is off, so say so again.
      tellMuted(true);
    }
    // A frame reaching us means we are connected.
    showParticipant({ ...peer, muted: state.muted, state: 'connected' });
  }

  function onPeerUpdated(peer) {
    if (peer.peer_id === state.selfId) {
      onSelfUpdated(peer);
      return;
    }
    const previous = state.participants.get(peer.peer_id);
    if (!previous) return;
    showParticipant(peer);
    // Back from reconnecting: it has dropped its peer connections, so ours to
    // it is rebuilt. The smaller id offers; the other waits for that offer.
    if (peerState(previous) === 'reconnecting' && peerState(peer) === 'connected' && shouldOffer(peer)) {
      offerTo(peer.peer_id);
    }
  }

  function removePeer(peerId) {
    closeLink(peerId);
    state.offerRetryMs.delete(peerId);
    state.participants.delete(peerId);
    const item = findParticipantItem(peerId);
    if (item) item.remove();
  }

  function onSocketClosed(code, reason) {
    state.socket = null;
    state.lastClose = { code, reason };
    clearTimeout(state.handshakeTimer);
    clearInterval(state.pingTimer);
    if (state.leaving) return;
    if (code === CLOSE_SESSION_INVALID) {
      startOver();
      return;
    }
    if (code === CLOSE_BAD_PASSWORD && state.lastError && state.lastError.code === 'bad_password' && !state.closeReason) {
      onBadPassword();
      return;
    }
    if (state.closeReason || isFinalClose(code)) {
      // Coming back would not help (or another tab has taken over): stop here.
      leaveRoomState();
      showDisconnected(state.closeReason || finalCloseReason(code));
      return;
    }
    // A drop: keep the room on screen, greyed, and the peer connections, which
    // may still carry audio; a fresh welcome rebuilds them.
    setChatEnabled(false);
    const self = state.participants.get(state.selfId);
    if (self) showParticipant({ ...self, state: 'reconnecting' });
    scheduleReconnect();
  }

  function finalCloseReason(code) {
    const error = state.lastError;
    const expected = Boolean(error) && error.code === CLOSE_ERRORS[code];
    if (expected && SERVER_WORDED_ERRORS.has(error.code) && error.message) return error.message;
    if (CLOSE_REASONS[code] && (!error || expected)) return CLOSE_REASONS[code];
    return error ? error.message : `The server closed the connection (${code}).`;
  }

  function leaveRoomState() {
    clearInterval(state.pingTimer);
    clearTimeout(state.handshakeTimer);
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    for (const peerId of [...state.links.keys()]) closeLink(peerId);
    for (const peerId of [...state.meters.keys()]) stopMeter(peerId);
    state.participants.clear();
    $('participants').replaceChildren();
    setChatEnabled(false);
  }

  // --- Peer connections -----------------------------------------------------

  function knownPeer(peerId) {
    return state.participants.has(peerId) && peerId !== state.selfId;
  }

  // An answer or candidate belongs to the current connection to its peer.
  // Without one, or from a peer we no longer (or never) knew, it is late traffic.
  function signal(peerId, task) {
    const link = state.links.get(peerId);
    if (!link || !knownPeer(peerId)) return;
    runInOrder(link, () => task(link));
  }

  // An offer always starts a fresh connection: the peer has started over
  // (it joined, resumed, or saw us come back), whatever we had before.
  function onOffer(peerId, sdp) {
    if (!knownPeer(peerId)) return;
    closeLink(peerId);
    const link = linkFor(peerId);
    runInOrder(link, () => acceptOffer(link, sdp));
  }

  function offerTo(peerId) {
    closeLink(peerId);
    const link = linkFor(peerId);
    runInOrder(link, () => sendOffer(link));
    watchOffer(link);
  }

  // Only the offering side watches, so a rebuild can never cross one from the other side.
  function watchOffer(link) {
    const wait = state.offerRetryMs.get(link.peerId) || OFFER_RETRY_MS;
    link.watchdog = setTimeout(() => {
      if (link.closed || link.pc.connectionState === 'connected') return;
      retryOffer(link, wait);
    }, wait);
  }

  function retryOffer(link, wait) {
    clearTimeout(link.watchdog);
    const peer = state.participants.get(link.peerId);
    const socketOpen = state.socket && state.socket.readyState === WebSocket.OPEN;
    // While we or the peer reconnect, the coming welcome or peer_updated rebuilds it.
    if (link.closed || !peer || !shouldOffer(peer) || !socketOpen || state.connection !== 'connected') return;
    state.offerRetryMs.set(link.peerId, Math.min(wait * 2, OFFER_RETRY_MAX_MS));
    console.warn(`voicebot: no connection to ${link.peerId} (${link.pc.connectionState}); offering again`);
    offerTo(link.peerId);
  }

  function onLinkState(link) {
    const { pc, peerId } = link;
    showPeerState(peerId, pc.connectionState);
    if (pc.connectionState === 'connected') {
      state.offerRetryMs.delete(peerId);
    } else if (pc.connectionState === 'failed' && link.watchdog) {
      // A failed connection does not come back by itself.
      const wait = state.offerRetryMs.get(peerId) || OFFER_RETRY_MS;
      clearTimeout(link.watchdog);
      link.watchdog = setTimeout(() => retryOffer(link, wait), Math.min(wait, 2000));
    }
  }

  // One peer's signaling steps run one after another, in arrival order, so a
  // candidate never races the description it belongs to.
  function runInOrder(link, task) {
    link.queue = link.queue
      .then(() => (link.closed ? undefined : task()))
      .catch((error) => console.warn(`voicebot: signaling with ${link.peerId} failed`, error));
  }

  function linkFor(peerId) {
    const pc = new RTCPeerConnection({ iceServers: state.iceServers });
    state.linkSerial += 1;
    const link = {
      peerId,
      serial: state.linkSerial,
      pc,
      pendingCandidates: [],
      queue: Promise.resolve(),
      audio: null,
      closed: false,
      watchdog: null, // set on the offering side
    };
    state.links.set(peerId, link);
    pc.addEventListener('icecandidate', (event) => {
      if (link.closed) return;
      send({ type: 'ice', to: peerId, candidate: event.candidate ? event.candidate.toJSON() : null });
    });
    pc.addEventListener('connectionstatechange', () => {
      if (!link.closed) onLinkState(link);
    });
    pc.addEventListener('track', (event) => {
      if (!link.closed) playRemote(link, event.streams[0] || new MediaStream([event.track]));
    });
    showPeerState(peerId, pc.connectionState);
    return link;
  }

  function closeLink(peerId) {
    const link = state.links.get(peerId);
    if (!link) return;
    link.closed = true;
    clearTimeout(link.watchdog);
    link.pc.close();
    if (link.audio) link.audio.remove();
    stopMeter(peerId);
    state.links.delete(peerId);
    showPeerState(peerId, '');
  }

  // Without a microphone we still ask to receive, so a listen-only
  // participant hears the others.
  function addLocalAudio(pc) {
    const track = state.localStream && state.localStream.getAudioTracks()[0];
    if (track) {
      pc.addTrack(track, state.localStream);
    } else if (pc.getTransceivers().length === 0) {
      pc.addTransceiver('audio', { direction: 'recvonly' });
    }
  }

  async function sendOffer(link) {
    addLocalAudio(link.pc);
    await link.pc.setLocalDescription();
    send({ type: 'offer', to: link.peerId, sdp: link.pc.localDescription.sdp });
  }

  // Every offer arrives on a fresh connection (see onOffer).
  async function acceptOffer(link, sdp) {
    await link.pc.setRemoteDescription({ type: 'offer', sdp });
    // After the offer is applied, addTrack reuses its audio transceiver
    // instead of adding a second one.
    addLocalAudio(link.pc);
    await addPendingCandidates(link);
    await link.pc.setLocalDescription();
    send({ type: 'answer', to: link.peerId, sdp: link.pc.localDescription.sdp });
  }

  async function acceptAnswer(link, sdp) {
    // Only an offer waiting for its answer takes one; anything else answers an older offer.
    if (link.pc.signalingState !== 'have-local-offer') return;
    await link.pc.setRemoteDescription({ type: 'answer', sdp });
    await addPendingCandidates(link);
  }

  async function addRemoteCandidate(link, candidate) {
    if (!link.pc.remoteDescription) {
      link.pendingCandidates.push(candidate);
      return;
    }
    await addCandidate(link, candidate);
  }

  async function addPendingCandidates(link) {
    const pending = link.pendingCandidates.splice(0);
    for (const candidate of pending) await addCandidate(link, candidate);
  }

  // One unusable candidate must not stop the others, so failures are only logged.
  async function addCandidate(link, candidate) {
    try {
      // null is the peer's end of candidates; addIceCandidate() says the same.
      await link.pc.addIceCandidate(candidate || undefined);
    } catch (error) {
      console.warn(`voicebot: ignored an ICE candidate from ${link.peerId}`, error);
    }
  }

  // --- Audio ----------------------------------------------------------------

  async function startMicrophone() {
    setStatus('connecting', 'Waiting for the microphone…');
    try {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new DOMException('No getUserMedia (an insecure page?)', 'NotSupportedError');
      }
      state.localStream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      const notice = $('mic-notice');
      notice.textContent =
        error.name === 'NotFoundError'
          ? "No microphone found — you can listen, but others can't hear you."
          : "Microphone blocked — you can listen, but others can't hear you.";
      notice.hidden = false;
    }
    $('mute-button').disabled = !state.localStream;
  }

  function sharedAudioContext() {
    if (!audioContext && window.AudioContext) {
      audioContext = new AudioContext();
      // Created without a click, the context may start suspended by the autoplay policy.
      if (audioContext.state === 'suspended') $('enable-sound').hidden = false;
    }
    return audioContext;
  }

  function playRemote(link, stream) {
    if (!link.audio) {
      link.audio = document.createElement('audio');
      link.audio.autoplay = true;
      $('remote-audio').append(link.audio);
    }
    link.audio.srcObject = stream;
    link.audio.play().catch(onPlayRejected);
    startMeter(link.peerId, stream);
  }

  function onPlayRejected(error) {
    if (error.name === 'NotAllowedError') $('enable-sound').hidden = false;
  }

  function enableSound() {
    $('enable-sound').hidden = true;
    if (audioContext) audioContext.resume();
    for (const audio of $('remote-audio').querySelectorAll('audio')) audio.play().catch(onPlayRejected);
  }

  function startMeter(peerId, stream) {
    stopMeter(peerId);
    const context = sharedAudioContext();
    if (!context) return;
    const source = context.createMediaStreamSource(stream);
    const analyser = context.createAnalyser();
    analyser.fftSize = 512;
    // The analyser only listens: it is not connected to the speakers, so no echo.
    source.connect(analyser);
    state.meters.set(peerId, { source, analyser, samples: new Float32Array(analyser.fftSize), loudUntil: 0 });
  }

  function stopMeter(peerId) {
    const meter = state.meters.get(peerId);
    if (!meter) return;
    meter.source.disconnect();
    state.meters.delete(peerId);
    showSpeaking(peerId, false);
  }

  function rootMeanSquare(samples) {
    let sum = 0;
    for (const sample of samples) sum += sample * sample;
    return Math.sqrt(sum / samples.length);
  }

  function updateSpeaking() {
    const now = performance.now();
    for (const [peerId, meter] of state.meters) {
      meter.analyser.getFloatTimeDomainData(meter.samples);
      if (rootMeanSquare(meter.samples) > SPEAKING_RMS) meter.loudUntil = now + SPEAKING_HOLD_MS;
      showSpeaking(peerId, now < meter.loudUntil);
    }
  }

  // The microphone, the button and our own entry follow `muted`; the server is not told.
  function applyMuted(muted) {
    state.muted = muted;
    for (const track of state.localStream ? state.localStream.getAudioTracks() : []) {
      track.enabled = !muted;
    }
    const button = $('mute-button');
    button.textContent = muted ? 'Unmute' : 'Mute';
    button.setAttribute('aria-pressed', String(muted));
    const self = state.participants.get(state.selfId);
    if (self) showParticipant({ ...self, muted });
  }

  // Tells the lobby, and waits for the echo. Without an open socket the next
  // welcome settles it.
  function tellMuted(muted) {
    if (!state.socket || state.socket.readyState !== WebSocket.OPEN) return;
    state.muteEchoes.push(muted);
    send({ type: 'mute', muted });
  }

  function toggleMute() {
    applyMuted(!state.muted);
    tellMuted(state.muted);
  }

  // --- Chat -----------------------------------------------------------------

  // A page joining starts at the room's newest message; a resumed one asks
  // for the messages it missed, if the room has any newer than ours.
  function catchUpChat(roomLastId) {
    if (typeof roomLastId !== 'number') return;
    if (state.welcomes === 1 && state.lastChatId === null) {
      state.lastChatId = roomLastId;
    } else if (roomLastId > (state.lastChatId ?? 0)) {
      send({ type: 'chat_history', after: state.lastChatId });
    }
  }

  // The server sends at most 100 at a time, oldest first; we ask on after the last.
  function onChatHistory(frame) {
    for (const message of frame.messages) showChat(message);
    if (frame.more && frame.messages.length > 0) {
      send({ type: 'chat_history', after: frame.messages[frame.messages.length - 1].id });
    }
  }

  function showChat(frame) {
    if (state.chatIds.has(frame.id)) return;
    state.chatIds.add(frame.id);
    state.lastChatId = Math.max(frame.id, state.lastChatId ?? 0);
    const log = $('chat-log');
    const item = $('chat-message-template').content.firstElementChild.cloneNode(true);
    item.dataset.chatId = String(frame.id);
    const time = item.querySelector('.chat-time');
    item.classList.toggle('own', frame.from === state.selfId);
    item.querySelector('.chat-name').textContent = frame.name;
    time.dateTime = frame.ts;
    time.textContent = new Date(frame.ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    item.querySelector('.chat-text').textContent = frame.text;
    // Follow new messages only if the reader has not scrolled up to read older ones.
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    // Fetched messages can come after newer ones that arrived live: each goes in its place.
    const newest = log.lastElementChild;
    const later = newest && Number(newest.dataset.chatId) > frame.id
      ? [...log.children].find((other) => Number(other.dataset.chatId) > frame.id)
      : null;
    log.insertBefore(item, later);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function sendChat(event) {
    event.preventDefault();
    const input = $('chat-input');
    const text = input.value.trim();
    if (!text) return;
    send({ type: 'chat', text });
    input.value = '';
  }

  // --- Controls -------------------------------------------------------------

  async function copyShareLink() {
    const input = $('share-link');
    const button = $('copy-link');
    try {
      await navigator.clipboard.writeText(input.value);
      button.textContent = 'Copied';
    } catch {
      // The clipboard API needs HTTPS; selecting the text lets the person copy it by hand.
      input.select();
      button.textContent = 'Press Ctrl+C';
    }
    setTimeout(() => {
      button.textContent = 'Copy';
    }, 2000);
  }

  // Closing with 1000 tells the server we left on purpose, so the others see
  // us go at once instead of waiting for us to come back.
  function leave() {
    state.leaving = true;
    if (state.socket) state.socket.close(CLOSE_LEAVING);
    leaveRoomState();
    if (state.localStream) state.localStream.getTracks().forEach((track) => track.stop());
    window.location.assign('/');
  }

  function bindControls() {
    $('mute-button').addEventListener('click', toggleMute);
    $('leave-button').addEventListener('click', leave);
    $('rejoin-button').addEventListener('click', join);
    $('copy-link').addEventListener('click', copyShareLink);
    $('enable-sound').addEventListener('click', enableSound);
    $('chat-form').addEventListener('submit', sendChat);
    window.addEventListener('online', reconnectNow);
  }

  async function start() {
    bindControls();
    setInterval(updateSpeaking, METER_MS);
    state.session = loadSession() || (await askForName());
    $('room-ui').hidden = false;
    await startMicrophone();
    await join();
  }

  start();
})();
