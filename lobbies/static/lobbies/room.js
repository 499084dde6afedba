// Room page: signaling over the lobby WebSocket, audio over a mesh of
// RTCPeerConnections (one per peer), and a text chat beside it.
'use strict';

(() => {
  const { loadSession, forgetSession, lastName, normalizeName, api, createSession } = window.voicebotSession;
  // Keeps proxies and load balancers from closing a quiet socket.
  const PING_MS = 25000;
  const METER_MS = 100;
  const SPEAKING_RMS = 0.02;
  // Speech has short gaps; holding the indicator keeps it from flickering.
  const SPEAKING_HOLD_MS = 300;
  // How long a passing notice (e.g. a message that could not be delivered) stays up.
  const NOTICE_MS = 6000;
  const CLOSE_REASONS = {
    4400: 'this lobby name is not valid.',
    4401: 'your session is no longer valid.',
    4403: 'the lobby is full.',
    4409: 'you joined this lobby from another tab or window.',
  };

  const $ = (id) => document.getElementById(id);
  const lobbyName = $('room').dataset.lobbyName;

  const state = {
    session: null,
    socket: null,
    selfId: null,
    iceServers: [],
    localStream: null,
    muted: false,
    leaving: false,
    // Why we closed the socket ourselves, shown instead of "connection lost".
    closeReason: '',
    pingTimer: null,
    noticeTimer: null,
    participants: new Map(), // peer_id -> {peer_id, name, bot, muted}, oneself included
    links: new Map(), // peer_id -> {peerId, pc, pendingCandidates, queue, audio, closed}
    meters: new Map(), // peer_id -> {source, analyser, samples, loudUntil}
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

  // --- Page state -----------------------------------------------------------

  function setStatus(connection, text) {
    const status = $('connection-status');
    status.dataset.state = connection;
    status.textContent = text;
  }

  function showDisconnected(reason) {
    setStatus('disconnected', `Disconnected: ${reason}`);
    $('rejoin-button').hidden = false;
  }

  // A passing note under the connection status; it never changes the connection state.
  function showNotice(text) {
    const notice = $('room-notice');
    notice.textContent = text;
    notice.hidden = false;
    clearTimeout(state.noticeTimer);
    state.noticeTimer = setTimeout(() => {
      notice.hidden = true;
      notice.textContent = '';
    }, NOTICE_MS);
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

  function showParticipant(peer) {
    state.participants.set(peer.peer_id, peer);
    const item = participantItem(peer.peer_id);
    const isSelf = peer.peer_id === state.selfId;
    item.classList.toggle('self', isSelf);
    item.dataset.muted = String(peer.muted);
    item.querySelector('.participant-name').textContent = peer.name;
    item.querySelector('.badge-you').hidden = !isSelf;
    item.querySelector('.badge-bot').hidden = !peer.bot;
    item.querySelector('.badge-muted').hidden = !peer.muted;
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

  async function join() {
    setStatus('connecting', 'Connecting…');
    $('rejoin-button').hidden = true;
    try {
      while (!(await resumeSession(state.session))) {
        // The server no longer knows this tab's session: start a new one.
        forgetSession();
        state.session = await askForName();
        $('room-ui').hidden = false;
        setStatus('connecting', 'Connecting…');
      }
    } catch {
      showDisconnected('could not reach the server.');
      return;
    }
    openSocket();
  }

  function openSocket() {
    const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    const socket = new WebSocket(`${scheme}${location.host}/ws/lobby/${encodeURIComponent(lobbyName)}/`);
    state.socket = socket;
    state.closeReason = '';
    // A socket replaced by a rejoin may still fire; only the current one counts.
    socket.addEventListener('message', (event) => {
      if (state.socket === socket) handleFrame(JSON.parse(event.data));
    });
    socket.addEventListener('close', (event) => {
      if (state.socket === socket) onSocketClosed(event);
    });
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
    offer: (frame) => signal(frame.from, (link) => acceptOffer(link, frame.sdp)),
    answer: (frame) => signal(frame.from, (link) => acceptAnswer(link, frame.sdp)),
    ice: (frame) => signal(frame.from, (link) => addRemoteCandidate(link, frame.candidate)),
    chat: showChat,
    error: onServerError,
  };

  function onWelcome(frame) {
    if (frame.peer_id !== state.session.id) {
      // Another tab resumed its own session between our resume and this
      // handshake, so the cookie named someone else: do not speak as them.
      state.closeReason = 'another tab signed in at the same moment; rejoin to try again.';
      state.socket.close(1000);
      return;
    }
    state.selfId = frame.peer_id;
    state.iceServers = frame.ice_servers || [];
    showParticipant({ peer_id: frame.peer_id, name: frame.name, bot: false, muted: state.muted });
    if (state.localStream) startMeter(state.selfId, state.localStream);
    frame.peers.forEach(onPeerJoined);
    setStatus('connected', 'Connected');
    setChatEnabled(true);
    // The server starts every join unmuted; carry a mute over a rejoin.
    if (state.muted) send({ type: 'mute', muted: true });
    state.pingTimer = setInterval(() => send({ type: 'ping' }), PING_MS);
  }

  // Errors that end the connection are explained by the close code. The others
  // concern one message only, so nothing is torn down.
  function onServerError(frame) {
    console.warn(`voicebot: server error ${frame.code}: ${frame.message}`);
    if (frame.code === 'delivery_failed') {
      // The addressed peer's inbox is full for the moment. The error does not say
      // which peer, so there is nothing to retry; the note explains a silent link.
      showNotice("A message to another participant couldn't be delivered; if you can't hear someone, rejoin.");
    }
  }

  function onPeerJoined(peer) {
    showParticipant(peer);
    // Glare-free rule: of each pair, the smaller peer id makes the offer.
    if (state.selfId < peer.peer_id && !state.links.has(peer.peer_id)) {
      const link = linkFor(peer.peer_id);
      runInOrder(link, () => sendOffer(link));
    }
  }

  function onPeerUpdated(peer) {
    // Our own echo can trail a quick mute-unmute; the local state is the truth.
    if (peer.peer_id === state.selfId) peer = { ...peer, muted: state.muted };
    if (state.participants.has(peer.peer_id)) showParticipant(peer);
  }

  function removePeer(peerId) {
    closeLink(peerId);
    state.participants.delete(peerId);
    const item = findParticipantItem(peerId);
    if (item) item.remove();
  }

  function onSocketClosed(event) {
    state.socket = null;
    leaveRoomState();
    if (state.leaving) return;
    showDisconnected(state.closeReason || CLOSE_REASONS[event.code] || 'connection lost.');
  }

  function leaveRoomState() {
    clearInterval(state.pingTimer);
    for (const peerId of [...state.links.keys()]) closeLink(peerId);
    for (const peerId of [...state.meters.keys()]) stopMeter(peerId);
    state.participants.clear();
    $('participants').replaceChildren();
    setChatEnabled(false);
  }

  // --- Peer connections -----------------------------------------------------

  // Signaling for a peer we no longer (or never) knew is late traffic; drop it.
  function signal(peerId, task) {
    if (!state.participants.has(peerId) || peerId === state.selfId) return;
    const link = linkFor(peerId);
    runInOrder(link, () => task(link));
  }

  // One peer's signaling steps run one after another, in arrival order, so a
  // candidate never races the description it belongs to.
  function runInOrder(link, task) {
    link.queue = link.queue
      .then(() => (link.closed ? undefined : task()))
      .catch((error) => console.warn(`voicebot: signaling with ${link.peerId} failed`, error));
  }

  function linkFor(peerId) {
    const existing = state.links.get(peerId);
    if (existing) return existing;
    const pc = new RTCPeerConnection({ iceServers: state.iceServers });
    const link = { peerId, pc, pendingCandidates: [], queue: Promise.resolve(), audio: null, closed: false };
    state.links.set(peerId, link);
    pc.addEventListener('icecandidate', (event) => {
      send({ type: 'ice', to: peerId, candidate: event.candidate ? event.candidate.toJSON() : null });
    });
    pc.addEventListener('connectionstatechange', () => showPeerState(peerId, pc.connectionState));
    pc.addEventListener('track', (event) => {
      playRemote(link, event.streams[0] || new MediaStream([event.track]));
    });
    showPeerState(peerId, pc.connectionState);
    return link;
  }

  function closeLink(peerId) {
    const link = state.links.get(peerId);
    if (!link) return;
    link.closed = true;
    link.pc.close();
    if (link.audio) link.audio.remove();
    stopMeter(peerId);
    state.links.delete(peerId);
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

  async function acceptOffer(link, sdp) {
    const firstOffer = !link.pc.remoteDescription;
    await link.pc.setRemoteDescription({ type: 'offer', sdp });
    // After the offer is applied, addTrack reuses its audio transceiver
    // instead of adding a second one.
    if (firstOffer) addLocalAudio(link.pc);
    await addPendingCandidates(link);
    await link.pc.setLocalDescription();
    send({ type: 'answer', to: link.peerId, sdp: link.pc.localDescription.sdp });
  }

  async function acceptAnswer(link, sdp) {
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

  function setMuted(muted) {
    state.muted = muted;
    for (const track of state.localStream ? state.localStream.getAudioTracks() : []) {
      track.enabled = !muted;
    }
    const button = $('mute-button');
    button.textContent = muted ? 'Unmute' : 'Mute';
    button.setAttribute('aria-pressed', String(muted));
    send({ type: 'mute', muted });
    const self = state.participants.get(state.selfId);
    if (self) showParticipant({ ...self, muted });
  }

  // --- Chat -----------------------------------------------------------------

  function showChat(frame) {
    const log = $('chat-log');
    const item = $('chat-message-template').content.firstElementChild.cloneNode(true);
    const time = item.querySelector('.chat-time');
    item.classList.toggle('own', frame.from === state.selfId);
    item.querySelector('.chat-name').textContent = frame.name;
    time.dateTime = frame.ts;
    time.textContent = new Date(frame.ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    item.querySelector('.chat-text').textContent = frame.text;
    // Follow new messages only if the reader has not scrolled up to read older ones.
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(item);
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

  function leave() {
    state.leaving = true;
    if (state.socket) state.socket.close(1000);
    leaveRoomState();
    if (state.localStream) state.localStream.getTracks().forEach((track) => track.stop());
    window.location.assign('/');
  }

  function bindControls() {
    $('mute-button').addEventListener('click', () => setMuted(!state.muted));
    $('leave-button').addEventListener('click', leave);
    $('rejoin-button').addEventListener('click', join);
    $('copy-link').addEventListener('click', copyShareLink);
    $('enable-sound').addEventListener('click', enableSound);
    $('chat-form').addEventListener('submit', sendChat);
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
