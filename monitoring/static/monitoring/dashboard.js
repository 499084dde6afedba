/* Staff performance dashboard: polls the JSON endpoint and draws uPlot charts. */
'use strict';

(function () {
  const DEFAULT_REFRESH_SECONDS = 5;
  const CHART_HEIGHT = 200;
  // Escapes keep this file ASCII, so it decodes the same whatever charset the static server declares.
  const NO_DATA = '\u2014'; // em dash
  const SEPARATOR = ' \u00b7 '; // middle dot
  // Mid-tone colours stay readable on both the light and the dark admin theme.
  const SERIES_COLOURS = ['#2b8cc4', '#e0543a'];
  // Rules needing attention sort first.
  const STATE_RANK = {critical: 0, warning: 1, ok: 2};

  const PANELS = [
    {key: 'requests', title: 'Requests per second', unit: 'req/s', series: [['http_requests_per_second']]},
    {key: 'latency', title: 'HTTP latency p95', unit: 'ms', series: [['http_latency_p95_ms']]},
    {key: 'errors', title: 'HTTP error rate', unit: '%', series: [['http_error_rate_percent']]},
    {key: 'websockets', title: 'WebSocket connections', unit: 'connections', series: [['websocket_connections']]},
    {
      key: 'signaling', title: 'Signaling messages per second', unit: 'msg/s',
      series: [['signaling_messages_per_second', 'messages'], ['signaling_errors_per_second', 'errors']],
    },
    {key: 'relay', title: 'Relay latency p95', unit: 'ms', series: [['relay_latency_p95_ms']]},
    {key: 'cache', title: 'Cache hit ratio', unit: '%', ceiling: 100, series: [['cache_hit_ratio_percent']]},
    {
      key: 'dbpool', title: 'Database pool', unit: 'connections',
      series: [['db_pool_in_use', 'in use'], ['db_pool_size', 'size']],
    },
    {key: 'bots', title: 'Bot end of speech to first audio p95', unit: 'ms', series: [['bot_first_audio_p95_ms']]},
    {key: 'cpu', title: 'CPU', unit: '% of one core', series: [['cpu_percent']]},
    {key: 'memory', title: 'Memory (RSS)', unit: 'MB', series: [['memory_mb']]},
    {key: 'readiness', title: 'Processes not ready', unit: 'processes', series: [['processes_not_ready']]},
  ];

  const root = document.getElementById('dashboard');
  if (!root) {
    return;
  }
  const windowSelect = document.getElementById('window');
  const errorLine = document.getElementById('error');
  if (typeof uPlot === 'undefined') {
    errorLine.textContent = 'Could not load the chart library (uPlot).';
    errorLine.hidden = false;
    return;
  }
  const charts = new Map(); // panel key -> {panel, container, plotArea, latest, plot}

  let inFlight = null; // AbortController of the running fetch, so a window change can cancel it
  let timer = null;
  let refreshMs = DEFAULT_REFRESH_SECONDS * 1000; // the last interval the server asked for

  // ---------- formatting ----------

  function hasValue(value) {
    return typeof value === 'number' && Number.isFinite(value);
  }

  function formatNumber(value) {
    if (!hasValue(value)) {
      return NO_DATA;
    }
    const magnitude = Math.abs(value);
    const digits = magnitude >= 100 ? 0 : magnitude >= 10 ? 1 : 2;
    return value.toLocaleString(undefined, {maximumFractionDigits: digits});
  }

  function formatWithUnit(value, unit) {
    return hasValue(value) ? formatNumber(value) + ' ' + unit : NO_DATA;
  }

  function clockTime(date) {
    return date.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false});
  }

  function timeElement(iso) {
    const el = document.createElement('time');
    const date = iso ? new Date(iso) : null;
    if (!date || Number.isNaN(date.getTime())) {
      el.textContent = NO_DATA;
      return el;
    }
    el.dateTime = iso;
    el.title = iso;
    el.textContent = date.toLocaleString([], {hour12: false});
    return el;
  }

  function cell(content, className) {
    const td = document.createElement('td');
    if (className) {
      td.className = className;
    }
    if (content instanceof Node) {
      td.append(content);
    } else {
      td.textContent = content;
    }
    return td;
  }

  function badge(text, tone) {
    const span = document.createElement('span');
    // The tone comes from a fixed list so JSON can never inject a class name.
    span.className = 'badge badge-' + (tone in STATE_RANK || tone === 'resolved' ? tone : 'unknown');
    span.textContent = text;
    return span;
  }

  // ---------- header ----------

  function renderHeader(data) {
    document.getElementById('storage').textContent = data.storage || NO_DATA;
    const processes = Array.isArray(data.processes) ? data.processes : [];
    const count = document.getElementById('process-count');
    count.textContent = String(processes.length);
    count.title = processes
      .map((p) => `${p.process} (${p.role}, ${p.ready ? 'ready' : 'not ready'})`)
      .join('\n');
    document.getElementById('updated').textContent = 'Updated ' + clockTime(new Date());
  }

  // ---------- alert rules ----------

  function ruleLink(rule) {
    // Only follow same-site paths: an admin_url like "javascript:..." must not become a live link.
    if (typeof rule.admin_url !== 'string' || !rule.admin_url.startsWith('/') || rule.admin_url.startsWith('//')) {
      return document.createTextNode(rule.name);
    }
    const a = document.createElement('a');
    a.href = rule.admin_url;
    a.textContent = rule.name;
    return a;
  }

  function ruleRow(rule) {
    const tr = document.createElement('tr');
    tr.dataset.rule = rule.name;
    tr.dataset.state = rule.state;
    tr.append(
      cell(badge(rule.state, rule.state)),
      cell(ruleLink(rule)),
      cell([rule.metric_label, rule.condition].filter(Boolean).join(' ')),
      cell(formatNumber(rule.value), 'numeric'),
      cell(timeElement(rule.since)),
    );
    return tr;
  }

  function rankOf(rule) {
    return STATE_RANK[rule.state] ?? STATE_RANK.ok + 1;
  }

  function renderRules(rules) {
    const body = document.querySelector('#rules tbody');
    if (!rules.length) {
      const tr = document.createElement('tr');
      const td = cell('No alert rules defined.', 'empty');
      td.colSpan = 5;
      tr.append(td);
      body.replaceChildren(tr);
      return;
    }
    const sorted = [...rules].sort((a, b) => rankOf(a) - rankOf(b));
    body.replaceChildren(...sorted.map(ruleRow));
  }

  // ---------- alert events ----------

  function eventItem(event) {
    const li = document.createElement('li');
    const rule = document.createElement('strong');
    rule.textContent = event.rule;
    const value = document.createElement('span');
    value.className = 'numeric';
    value.textContent = formatNumber(event.value);
    const message = document.createElement('span');
    message.className = 'message';
    message.textContent = event.message;
    const tone = event.kind === 'firing' ? event.severity : 'resolved';
    li.append(timeElement(event.at), rule, badge(event.kind, tone), value, message);
    return li;
  }

  function renderEvents(events) {
    const list = document.getElementById('events');
    if (!events.length) {
      const li = document.createElement('li');
      li.className = 'empty';
      li.textContent = 'No alert events yet.';
      list.replaceChildren(li);
      return;
    }
    list.replaceChildren(...events.map(eventItem));
  }

  // ---------- charts ----------

  // Canvas cannot use CSS variables, so resolve them at every draw to follow the admin theme.
  function themeColour(name) {
    return getComputedStyle(root).getPropertyValue(name).trim();
  }

  function axis() {
    return {
      stroke: () => themeColour('--body-quiet-color'),
      grid: {stroke: () => themeColour('--hairline-color'), width: 1},
      ticks: {stroke: () => themeColour('--border-color'), width: 1},
    };
  }

  function yRange(panel) {
    // Start at zero so a small change does not look like a cliff; cap ratios at their ceiling.
    return (u, min, max) => {
      const top = max > 0 ? max * 1.1 : 1;
      return [0, panel.ceiling ? Math.min(top, panel.ceiling) : top];
    };
  }

  function plotOptions(panel, width) {
    const series = panel.series.map(([, label], i) => ({
      label: label || panel.unit,
      stroke: SERIES_COLOURS[i % SERIES_COLOURS.length],
      width: 1.5,
      spanGaps: false,
      // A point with gaps on both sides (a process that just started) has no line to show it.
      points: {show: true, size: 3},
      value: (u, v) => formatWithUnit(v, panel.unit),
    }));
    return {
      width,
      height: CHART_HEIGHT,
      // Zooming would be undone by the next refresh a few seconds later.
      cursor: {drag: {x: false, y: false}},
      scales: {x: {time: true}, y: {range: yRange(panel)}},
      series: [{label: 'Time'}, ...series],
      axes: [axis(), {...axis(), size: 56}],
    };
  }

  function buildChartContainers() {
    const grid = document.getElementById('charts');
    for (const panel of PANELS) {
      const container = document.createElement('div');
      container.className = 'chart';
      container.dataset.chart = panel.key;
      const heading = document.createElement('h3');
      const title = document.createElement('span');
      title.textContent = panel.title;
      const latest = document.createElement('span');
      latest.className = 'latest';
      latest.textContent = NO_DATA;
      heading.append(title, latest);
      const plotArea = document.createElement('div');
      plotArea.className = 'plot';
      container.append(heading, plotArea);
      grid.append(container);
      charts.set(panel.key, {panel, container, plotArea, latest, plot: null});
    }
  }

  function columnOf(series, name, length) {
    const values = series[name];
    return Array.isArray(values) && values.length === length ? values : new Array(length).fill(null);
  }

  function lastValue(values) {
    for (let i = values.length - 1; i >= 0; i--) {
      if (hasValue(values[i])) {
        return values[i];
      }
    }
    return null;
  }

  function latestText(panel, columns) {
    if (columns.length === 1) {
      return formatWithUnit(lastValue(columns[0]), panel.unit);
    }
    const parts = columns.map((values, i) => `${panel.series[i][1]} ${formatNumber(lastValue(values))}`);
    return parts.join(SEPARATOR) + ' ' + panel.unit;
  }

  function renderChart(chart, times, series) {
    const columns = chart.panel.series.map(([name]) => columnOf(series, name, times.length));
    const data = [times, ...columns];
    if (chart.plot) {
      chart.plot.setData(data);
    } else {
      chart.plot = new uPlot(plotOptions(chart.panel, chart.plotArea.clientWidth), data, chart.plotArea);
    }
    chart.latest.textContent = latestText(chart.panel, columns);
    const points = columns.reduce((sum, values) => sum + values.filter(hasValue).length, 0);
    chart.container.dataset.points = String(points);
  }

  function renderCharts(series) {
    const times = Array.isArray(series.t) ? series.t : [];
    for (const chart of charts.values()) {
      renderChart(chart, times, series);
    }
  }

  function redrawCharts() {
    for (const chart of charts.values()) {
      if (chart.plot) {
        chart.plot.redraw(false);
      }
    }
  }

  function watchSizeAndTheme() {
    const resizer = new ResizeObserver((entries) => {
      for (const entry of entries) {
        const chart = charts.get(entry.target.parentElement.dataset.chart);
        if (chart && chart.plot) {
          chart.plot.setSize({width: entry.target.clientWidth, height: CHART_HEIGHT});
        }
      }
    });
    for (const chart of charts.values()) {
      resizer.observe(chart.plotArea);
    }
    // The admin theme toggle flips data-theme on <html>; "auto" follows the OS setting.
    new MutationObserver(redrawCharts).observe(document.documentElement, {attributeFilter: ['data-theme']});
    window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', redrawCharts);
  }

  // ---------- loading ----------

  function showError(message) {
    errorLine.textContent = 'Could not load data: ' + message;
    errorLine.hidden = false;
  }

  function clearError() {
    errorLine.hidden = true;
    errorLine.textContent = '';
  }

  async function failureReason(response) {
    const status = `HTTP ${response.status} ${response.statusText}`.trim();
    // The data view explains a rejected window in a JSON "error" field; other failures have no such body.
    try {
      const body = await response.json();
      return body && body.error ? `${status}: ${body.error}` : status;
    } catch {
      return status;
    }
  }

  async function fetchData(signal) {
    const url = new URL(root.dataset.url, window.location.href);
    url.searchParams.set('window', root.dataset.window);
    const response = await fetch(url, {
      credentials: 'same-origin',
      headers: {Accept: 'application/json'},
      signal,
    });
    if (!response.ok) {
      throw new Error(await failureReason(response));
    }
    // An expired session is redirected to the login page, which answers 200 with HTML.
    const type = response.headers.get('Content-Type') || '';
    if (response.redirected || !type.includes('json')) {
      throw new Error('the server did not answer with JSON (has your session expired? reload the page)');
    }
    return response.json();
  }

  function render(data) {
    renderHeader(data);
    renderRules(Array.isArray(data.rules) ? data.rules : []);
    renderEvents(Array.isArray(data.events) ? data.events : []);
    renderCharts(data.series || {});
  }

  function refreshInterval(data) {
    const seconds = Number(data.refresh_seconds);
    return (seconds >= 1 ? seconds : DEFAULT_REFRESH_SECONDS) * 1000;
  }

  async function refresh() {
    clearTimeout(timer);
    if (inFlight) {
      inFlight.abort();
    }
    const controller = new AbortController();
    inFlight = controller;
    try {
      const data = await fetchData(controller.signal);
      refreshMs = refreshInterval(data);
      render(data);
      clearError();
    } catch (error) {
      if (!controller.signal.aborted) {
        showError(error.message || String(error));
      }
    }
    // A newer refresh (window change) has taken over and schedules its own next tick.
    if (inFlight === controller) {
      inFlight = null;
      timer = setTimeout(refresh, refreshMs);
    }
  }

  function onWindowChange() {
    root.dataset.window = windowSelect.value;
    refresh();
  }

  // The default window may be missing from the options (short retention); start from what the select shows.
  root.dataset.window = windowSelect.value;
  buildChartContainers();
  watchSizeAndTheme();
  windowSelect.addEventListener('change', onWindowChange);
  refresh();
})();
