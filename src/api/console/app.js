// nn-gateway console: a client of the gateway's JSON API under /api/v1/. Plain JavaScript,
// no framework, no build step, nothing loaded from elsewhere (the gateway has no internet).
//
// Rules kept throughout: every value from the API reaches the DOM as text (text nodes or
// textContent, never HTML); the visible screen is polled every 2 s while the tab is visible;
// a poll never throws away what the operator is typing; every API error is shown as the
// gateway phrased it, in the banner.
'use strict';

const TOKEN_KEY = 'nn-gateway.api-token';
const POLL_MS = 2000;
const CLOUDS = ['golioth', 'netneural'];
const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------
// DOM and formatting helpers

/** h('div', {class: 'x', testid: 'y', onclick: f}, child, 'text', …): an element. Strings
 * become text nodes; null, undefined and false children are left out. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'testid') el.dataset.testid = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'value' || k === 'checked' || k === 'disabled' || k === 'hidden') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  el.append(...children.flat(Infinity).filter((c) => c != null && c !== false)
    .map((c) => (c instanceof Node ? c : String(c))));
  return el;
}

/** A definition list from [term, value] pairs (a value may be an element). */
function facts(pairs, testid) {
  return h('dl', { class: 'facts', testid }, pairs.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

/** A table that turns into labelled blocks on a narrow screen (app.css). `rows` are
 * {testid, attrs, cells}. */
function table(testid, columns, rows) {
  return h('table', { class: 'rows', testid },
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', {}, c)))),
    h('tbody', {}, rows.map((r) => h('tr', { testid: r.testid, ...r.attrs },
      r.cells.map((c, i) => h('td', { 'data-label': columns[i] }, c ?? '—'))))));
}

const pretty = (v) => (v === undefined || v === null ? '—' : JSON.stringify(v, null, 2));
const compact = (v) => (v === undefined ? '—' : JSON.stringify(v));

function ago(t) {
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** A time (unix ms or an RFC 3339 string) as "12 s ago", the full time on hover. */
function when(t) {
  if (t === null || t === undefined) return 'never';
  const d = new Date(t);
  if (Number.isNaN(d.getTime())) return String(t);
  return h('time', { datetime: d.toISOString(), title: d.toLocaleString() }, ago(d.getTime()));
}

function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

/** The state words of the API (snake_case) as people say them. */
const human = (w) => String(w ?? 'unknown').replaceAll('_', ' ');
const badge = (word, testid) => h('span', { class: `badge s-${String(word).replace(/[^a-z_]/g, '')}`, testid }, human(word));

// ---------------------------------------------------------------------------------------
// The banner

const banner = {
  source: null,
  timer: null,
  /** kind 'error' or 'notice'; an error from a poll (`source` 'poll') goes by itself when a
   * poll succeeds again; a notice goes after a while; an error from an action stays. */
  show(text, kind = 'error', source = 'action') {
    clearTimeout(this.timer);
    $('banner-text').textContent = text;
    $('banner').className = `banner ${kind}`;
    $('banner').dataset.kind = kind;
    $('banner').hidden = false;
    this.source = source;
    if (kind === 'notice') this.timer = setTimeout(() => this.clear(), 10000);
  },
  clear(source) {
    if (source && source !== this.source) return;
    $('banner').hidden = true;
    this.source = null;
  },
};

// ---------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let token = sessionStorage.getItem(TOKEN_KEY);

/** One API call: the parsed JSON body, or an ApiError (status 0: the gateway did not
 * answer). A 401 opens the token form. */
async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let r;
  let text;
  try {
    r = await fetch(path, {
      method, headers, cache: 'no-store', body: body === undefined ? undefined : JSON.stringify(body),
    });
    text = await r.text();
  } catch (e) {
    throw new ApiError(0, 'unreachable', `Gateway unreachable: ${e.message}`);
  }
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON: reported below */ }
  if (r.ok) return data;
  const e = data && data.error;
  const err = new ApiError(r.status, e?.code ?? `http_${r.status}`,
    e?.message ?? `${r.status} ${r.statusText}${text ? `: ${text.slice(0, 200)}` : ''}`);
  if (r.status === 401) askToken(token ? `The gateway refused this token: ${err.message}` : null);
  throw err;
}

/** Shows what went wrong (a 401 is shown by the token form instead). */
function failed(err, source = 'action') {
  if (err.status === 401) return;
  if (!(err instanceof ApiError)) { banner.show(`Console error: ${err.message}`, 'error', source); return; }
  const text = err.status === 0 ? err.message : `${err.message} (HTTP ${err.status}, ${err.code})`;
  banner.show(text, 'error', source);
}

/** Runs an action from `button` (disabled meanwhile), showing its error. */
async function act(button, fn) {
  button.disabled = true;
  try { return await fn(); } catch (e) { failed(e); return undefined; } finally { button.disabled = false; }
}

// ---------------------------------------------------------------------------------------
// The token

function askToken(problem) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $('forget').hidden = true;
  $('view').hidden = true;
  $('token-form').hidden = false;
  $('token-input').focus();
  if (problem) banner.show(problem, 'error', 'token');
  else banner.clear('poll');
}

$('token-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const value = $('token-input').value.trim();
  if (!value) return;
  token = value;
  sessionStorage.setItem(TOKEN_KEY, value);
  $('token-input').value = '';
  $('token-form').hidden = true;
  $('view').hidden = false;
  $('forget').hidden = false;
  banner.clear('token');
  refreshNow();
});

$('forget').addEventListener('click', (ev) => {
  ev.preventDefault();
  askToken(null);
});

$('banner-close').addEventListener('click', () => banner.clear());

// ---------------------------------------------------------------------------------------
// Routing and polling

let current = null; // { refresh(), poll } of the visible screen
let timer = null;
let busy = false;
let again = false;

function route() {
  const [name, ...rest] = location.hash.replace(/^#\/?/, '').split('/');
  let param = rest.join('/') || null;
  try { param = param && decodeURIComponent(param); } catch { param = null; } // a mangled link
  const screen = name === 'devices' && param !== null ? 'device' : name;
  const make = SCREENS[screen];
  if (!make) { location.hash = '#/overview'; return; }
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.hash === `#/${name}`);
  const root = h('section', { class: 'screen', testid: `screen-${screen}` });
  $('view').replaceChildren(root);
  banner.clear('poll');
  current = make(root, param);
  refreshNow();
}

/** Refreshes the visible screen now, then every POLL_MS while the tab is visible. */
async function refreshNow() {
  clearTimeout(timer);
  if (busy) { again = true; return; }
  const screen = current;
  if (!screen || document.hidden || !$('token-form').hidden) return;
  busy = true;
  try {
    await screen.refresh();
    if (screen === current) {
      banner.clear('poll');
      $('refreshed').textContent = `Updated ${new Date().toLocaleTimeString()}`;
    }
  } catch (e) {
    if (screen === current) failed(e, 'poll');
  } finally {
    busy = false;
  }
  if (again) { again = false; refreshNow(); return; }
  if (screen === current && screen.poll !== false && !document.hidden) timer = setTimeout(refreshNow, POLL_MS);
}

document.addEventListener('visibilitychange', () => {
  if (document.hidden) {
    clearTimeout(timer);
    $('refreshed').textContent = 'Paused while the tab is hidden';
  } else refreshNow();
});
window.addEventListener('hashchange', route);

function setConflictCount(n) {
  const el = $('conflict-count');
  el.textContent = String(n);
  el.hidden = !n;
}

// ---------------------------------------------------------------------------------------
// Overview

function overviewScreen(root) {
  const sync = h('button', { testid: 'sync-now' }, 'Sync now');
  sync.addEventListener('click', () => act(sync, async () => {
    await api('POST', '/api/v1/sync');
    banner.show('Sync run requested: its result appears here and in the sync history.', 'notice');
  }));
  const body = h('div', { class: 'cards' });
  root.append(h('div', { class: 'head' }, h('h1', {}, 'Overview'), sync), body);
  return {
    async refresh() {
      const s = await api('GET', '/api/v1/status');
      setConflictCount(s.conflicts_pending ?? 0);
      const live = s.live ?? {};
      const clouds = live.clouds ?? s.daemon?.clouds ?? {};
      body.replaceChildren(
        ...CLOUDS.map((c) => cloudCard(c, clouds[c], s)),
        gatewayCard(s, live),
        lastSyncCard(s.sync_last_run, live.sync_enabled),
      );
    },
  };
}

function cloudCard(name, c, s) {
  const rows = (s.outbox ?? []).filter((o) => o.target === name);
  const count = (state) => rows.filter((o) => o.state === state).reduce((n, o) => n + o.rows, 0);
  const backlog = (s.telemetry_backlog ?? []).find(([t]) => t === name)?.[1] ?? 0;
  const state = c?.state ?? 'disabled';
  return h('article', { class: 'card', testid: `cloud-${name}` },
    h('h2', {}, name === 'golioth' ? 'Golioth' : 'NetNeural', ' ', badge(state, `cloud-state-${name}`)),
    facts([
      c && ['State since', when(c.since)],
      ['Queue', h('span', { testid: `queue-${name}` },
        `${count('pending')} pending, ${count('in_flight')} in flight, ${count('dead')} dead`)],
      backlog ? ['Telemetry owed', `${backlog} points`] : null,
      c && ['Last success', when(c.last_success_at)],
      c && ['Last error', c.last_error
        ? h('span', { class: 'bad', testid: `cloud-error-${name}` }, when(c.last_error_at), ': ', c.last_error)
        : h('span', { testid: `cloud-error-${name}` }, 'none')],
    ]));
}

function gatewayCard(s, live) {
  const running = s.daemon_running ?? (s.daemon && !s.daemon.stopped);
  const mqtt = live.mqtt ?? s.daemon?.mqtt ?? 'unknown';
  return h('article', { class: 'card', testid: 'gateway' },
    h('h2', {}, 'Gateway ', badge(running ? 'running' : 'stopped', 'daemon-state')),
    facts([
      ['MQTT broker', [badge(mqtt, 'mqtt-state'),
        live.mqtt_error ? h('span', { class: 'bad', testid: 'mqtt-error' }, ' ', live.mqtt_error) : null]],
      ['Ingest', h('span', { testid: 'ingest-rate' },
        live.ingest_per_s == null ? 'not measured' : `${live.ingest_per_s.toFixed(1)} messages/s`)],
      ['Devices', h('a', { href: '#/devices' }, String(s.devices ?? 0))],
      ['Telemetry', `${s.telemetry_points ?? 0} points`],
      ['Conflicts', h('a', { href: '#/conflicts', testid: 'conflicts-pending' }, `${s.conflicts_pending ?? 0} pending`)],
      ['Rejected', `${s.rejected_total ?? 0} messages`],
      ['Disk', h('span', { testid: 'disk-use' },
        `${bytes(s.db_bytes)} database + ${bytes(s.wal_bytes)} WAL (${bytes(s.used_bytes)} in use)`)],
    ]));
}

function lastSyncCard(run, enabled) {
  const content = !run
    ? h('p', { class: 'empty' }, enabled === false ? 'Sync is off in the configuration.' : 'No sync run yet.')
    : [
      facts([
        ['Ran', when(run.at)],
        ['Devices', String(run.devices ?? 0)],
        ['Taken / pushed', `${run.taken ?? 0} taken, ${run.pushed ?? 0} pushed, ${run.push_failed ?? 0} failed`],
        ['Conflicts', String(run.conflicts ?? 0)],
        ['Duration', `${run.duration_ms ?? '?'} ms`],
      ]),
      (run.errors ?? []).length
        ? h('ul', { class: 'bad', testid: 'last-sync-errors' }, run.errors.map((e) => h('li', {}, e))) : null,
    ];
  return h('article', { class: 'card', testid: 'last-sync' }, h('h2', {}, 'Last sync run'), content);
}

// ---------------------------------------------------------------------------------------
// Devices

let lastQuery = '';

function devicesScreen(root) {
  const limit = 50;
  let offset = 0;
  const search = h('input', {
    type: 'search', placeholder: 'Search by device key', testid: 'device-search', value: lastQuery, 'aria-label': 'Search devices',
  });
  search.addEventListener('input', () => { lastQuery = search.value; offset = 0; refreshNow(); });
  const list = h('div', { testid: 'device-list' });
  const pager = h('div', { class: 'pager' });
  root.append(h('div', { class: 'head' }, h('h1', {}, 'Devices'), search), list, pager);
  const page = (delta) => () => { offset = Math.max(0, offset + delta); refreshNow(); };
  return {
    async refresh() {
      const q = search.value.trim();
      const r = await api('GET', `/api/v1/devices?q=${enc(q)}&limit=${limit}&offset=${offset}`);
      const devices = r.devices ?? [];
      list.replaceChildren(devices.length
        ? table('device-table', ['Device', 'Origin', 'Last seen', 'Reported', 'Desired', 'Telemetry'],
          devices.map((d) => ({
            testid: 'device-row',
            attrs: { 'data-key': d.key },
            cells: [
              h('a', { href: `#/devices/${enc(d.key)}`, testid: 'device-link' }, d.key),
              d.origin,
              when(d.last_seen),
              d.reported_version == null ? null : `v${d.reported_version}`,
              d.desired_version == null ? null : `v${d.desired_version}`,
              `${d.telemetry_points} points`,
            ],
          })))
        : h('p', { class: 'empty', testid: 'devices-empty' }, q ? `No device matches “${q}”.` : 'No devices yet.'));
      const total = r.total ?? devices.length;
      pager.replaceChildren(
        h('span', {}, devices.length ? `${offset + 1}–${offset + devices.length} of ${total}` : `${total} devices`),
        h('button', { class: 'secondary', disabled: offset === 0, onclick: page(-limit) }, 'Previous'),
        h('button', { class: 'secondary', disabled: offset + devices.length >= total, onclick: page(limit) }, 'Next'),
      );
    },
  };
}

/** The text's JSON value, or an error message. With `object`, only a JSON object will do. */
function parseJson(text, object) {
  if (!text.trim()) return { error: 'Enter a JSON value.' };
  let value;
  try { value = JSON.parse(text); } catch (e) { return { error: `Not valid JSON: ${e.message}` }; }
  if (object && (value === null || typeof value !== 'object' || Array.isArray(value))) {
    return { error: 'The desired document must be a JSON object, such as {"led": "on"}.' };
  }
  return { value };
}

function deviceScreen(root, key) {
  let dev = null;
  const summary = h('div');
  const reported = h('pre', { testid: 'device-reported' });
  const desired = h('pre', { testid: 'device-desired' });
  const reportedV = h('span', { class: 'muted', testid: 'device-reported-version' });
  const desiredV = h('span', { class: 'muted', testid: 'device-desired-version' });
  const editor = h('textarea', { testid: 'desired-editor', rows: 8, spellcheck: 'false', 'aria-label': 'Desired document (JSON)' });
  const error = h('p', { class: 'field-error', testid: 'desired-error', role: 'alert', hidden: true });
  const save = h('button', { testid: 'desired-save' }, 'Save desired');
  const cancel = h('button', { class: 'secondary', testid: 'desired-cancel' }, 'Cancel');
  const edit = h('button', { testid: 'edit-desired' }, 'Edit desired');
  const editing = h('div', { class: 'editor', testid: 'desired-edit', hidden: true }, editor, error, h('div', { class: 'actions' }, save, cancel));

  const validate = () => {
    const r = parseJson(editor.value, true);
    error.textContent = r.error ?? '';
    error.hidden = !r.error;
    save.disabled = Boolean(r.error);
    return r;
  };
  const close = () => { editing.hidden = true; edit.hidden = false; };
  editor.addEventListener('input', validate);
  edit.addEventListener('click', () => {
    editor.value = pretty(dev?.desired ?? {});
    validate();
    editing.hidden = false;
    edit.hidden = true;
    editor.focus();
  });
  cancel.addEventListener('click', close);
  save.addEventListener('click', () => {
    const r = validate();
    if (r.error) return undefined;
    return act(save, async () => {
      const out = await api('PUT', `/api/v1/devices/${enc(key)}/desired`, r.value);
      close();
      banner.show(`Desired document of ${key} saved (version ${out?.version ?? '?'}): the gateway publishes it to the device and syncs it to the clouds.`, 'notice');
      refreshNow();
    });
  });

  root.append(
    h('div', { class: 'head' }, h('h1', { testid: 'device-key' }, key), h('a', { href: '#/devices' }, '← All devices')),
    summary,
    h('div', { class: 'docs' },
      h('article', { class: 'card' }, h('h2', {}, 'Reported ', reportedV), reported),
      h('article', { class: 'card' }, h('h2', {}, 'Desired ', desiredV), desired, edit, editing)),
  );
  return {
    async refresh() {
      dev = await api('GET', `/api/v1/devices/${enc(key)}`);
      const link = (cloud) => {
        const l = dev.links?.[cloud];
        const id = typeof l === 'string' ? l : l?.id;
        return h('code', { testid: `link-${cloud}`, title: id ? `${cloud} device id` : null }, id ?? 'not linked');
      };
      summary.replaceChildren(h('article', { class: 'card' }, facts([
        ['Origin', dev.origin],
        ['First seen', when(dev.first_seen)],
        ['Last seen', when(dev.last_seen)],
        ['Telemetry', `${dev.telemetry_points} points`],
        ['Golioth', link('golioth')],
        ['NetNeural', link('netneural')],
        dev.removed_from?.length ? ['Removed from', dev.removed_from.join(', ')] : null,
      ], 'device-facts')));
      reported.textContent = pretty(dev.reported);
      desired.textContent = pretty(dev.desired);
      reportedV.textContent = dev.reported_version == null ? '' : `v${dev.reported_version}`;
      desiredV.textContent = dev.desired_version == null ? '' : `v${dev.desired_version}`;
    },
  };
}

// ---------------------------------------------------------------------------------------
// Conflicts

function conflictsScreen(root) {
  const all = h('input', { type: 'checkbox', testid: 'conflicts-all' });
  all.addEventListener('change', () => { cards.clear(); refreshNow(); });
  const list = h('div', { class: 'conflicts', testid: 'conflict-list' });
  /** id → { el, sig, dirty() }: cards kept between polls, and never replaced while the
   * operator types a value into one. */
  const cards = new Map();
  root.append(h('div', { class: 'head' }, h('h1', {}, 'Conflicts'),
    h('label', { class: 'check' }, all, ' Show resolved too')), list);

  const resolved = (id) => { cards.delete(id); refreshNow(); };
  return {
    async refresh() {
      const rows = await api('GET', `/api/v1/conflicts?all=${all.checked}&limit=100`);
      if (!all.checked) setConflictCount(rows.length);
      const seen = new Set();
      const next = [];
      for (const c of rows) {
        seen.add(c.id);
        const sig = JSON.stringify(c);
        let card = cards.get(c.id);
        if (!card || (card.sig !== sig && !card.dirty())) {
          card = conflictCard(c, sig, resolved);
          cards.set(c.id, card);
        }
        next.push(card.el);
      }
      for (const [id, card] of cards) {
        if (seen.has(id)) continue;
        if (card.dirty()) next.push(card.el); else cards.delete(id);
      }
      if (!next.length) next.push(h('p', { class: 'empty', testid: 'conflicts-empty' }, all.checked ? 'No conflicts recorded.' : 'No pending conflicts.'));
      // Moving a focused element blurs it: touch the list only when its cards changed.
      const same = next.length === list.children.length && next.every((el, i) => list.children[i] === el);
      if (!same) list.replaceChildren(...next);
    },
  };
}

function conflictCard(c, sig, resolved) {
  const side = (testid, title, value, at) => h('div', { class: 'side', testid },
    h('h4', {}, title), h('pre', {}, pretty(value)), at ? h('p', { class: 'muted' }, 'changed ', when(at)) : null);
  const cloud = c.target === 'golioth' ? 'Golioth' : c.target === 'netneural' ? 'NetNeural' : c.target;
  const custom = h('textarea', {
    rows: 2, spellcheck: 'false', testid: 'resolve-custom-input', placeholder: 'A JSON value: "green", 42, {"a": 1}', 'aria-label': 'Custom value (JSON)',
  });
  const error = h('p', { class: 'field-error', testid: 'resolve-custom-error', role: 'alert', hidden: true });
  const resolve = (button, body) => act(button, async () => {
    try {
      const r = await api('POST', `/api/v1/conflicts/${c.id}/resolve`, body);
      banner.show(`Conflict on ${c.device} ${c.field} resolved with ${compact(r?.value)}: the gateway writes it to both clouds and the device.`, 'notice');
    } catch (e) {
      if (e.status !== 409) throw e;
      banner.show(`This conflict (${c.device} ${c.field}) was already resolved by someone else; your choice was not applied. The list shows its current state.`, 'error');
    }
    custom.value = '';
    resolved(c.id);
  });
  const local = h('button', { testid: 'resolve-local' }, 'Use local');
  const remote = h('button', { testid: 'resolve-remote' }, 'Use remote');
  const mine = h('button', { class: 'secondary', testid: 'resolve-custom' }, 'Use this value');
  local.addEventListener('click', () => resolve(local, { use: 'local' }));
  remote.addEventListener('click', () => resolve(remote, { use: 'remote' }));
  mine.addEventListener('click', () => {
    const r = parseJson(custom.value, false);
    error.textContent = r.error ?? '';
    error.hidden = !r.error;
    return r.error ? undefined : resolve(mine, { value: r.value });
  });
  custom.addEventListener('input', () => { error.hidden = true; });

  const pending = c.status === 'pending';
  const el = h('article', { class: 'card conflict', testid: 'conflict-card', 'data-id': c.id, 'data-status': c.status },
    h('h2', {}, h('a', { href: `#/devices/${enc(c.device)}` }, c.device), ' ', h('code', { testid: 'conflict-field' }, c.field), ' ', badge(c.status)),
    h('p', { class: 'muted' }, `${cloud} · detected `, when(c.detected_at), c.strategy ? ` · ${human(c.strategy)}` : ''),
    h('div', { class: 'sides' },
      side('conflict-local', 'Local (mirror)', c.local, c.local_at),
      side('conflict-remote', `Remote (${cloud})`, c.remote, c.remote_at),
      side('conflict-base', 'Base (last agreed)', c.base)),
    pending
      ? h('div', { class: 'resolve' }, h('div', { class: 'actions' }, local, remote),
        custom, error, h('div', { class: 'actions' }, mine))
      : facts([['Resolved with', compact(c.resolved_value)], ['By', c.resolved_by ?? '—'], ['At', when(c.resolved_at)]]));
  return { el, sig, dirty: () => custom.value.trim() !== '' || document.activeElement === custom };
}

// ---------------------------------------------------------------------------------------
// Sync history

function syncScreen(root) {
  const select = (testid, label, options) => h('label', { class: 'filter' }, `${label} `,
    h('select', { testid }, options.map(([v, text]) => h('option', { value: v }, text))));
  const cloudSel = select('sync-filter-cloud', 'Cloud', [['', 'all'], ['golioth', 'Golioth'], ['netneural', 'NetNeural'], ['mirror', 'mirror']]);
  const outcomeSel = select('sync-filter-outcome', 'Outcome', [['', 'all'], ['completed', 'completed'], ['partial', 'partial'], ['failed', 'failed']]);
  const value = (label) => label.querySelector('select').value;
  const limit = 50;
  /** Keyset paging: `before` is the last id of the page above; `above` the `before`s of the
   * pages passed on the way down, for "Newer". */
  let before = null;
  let above = [];
  for (const l of [cloudSel, outcomeSel]) {
    l.addEventListener('change', () => { before = null; above = []; refreshNow(); });
  }
  const list = h('div', { testid: 'sync-log' });
  const pager = h('div', { class: 'pager' });
  root.append(h('div', { class: 'head' }, h('h1', {}, 'Sync history'), h('div', { class: 'filters' }, cloudSel, outcomeSel)), list, pager);
  return {
    async refresh() {
      const params = new URLSearchParams({ limit: String(limit) });
      if (value(cloudSel)) params.set('cloud', value(cloudSel));
      if (value(outcomeSel)) params.set('outcome', value(outcomeSel));
      if (before !== null) params.set('before', String(before));
      const rows = await api('GET', `/api/v1/sync-log?${params}`);
      list.replaceChildren(rows.length
        ? table('sync-table', ['When', 'Cloud', 'Operation', 'Device', 'Count', 'Conflicts', 'Outcome', 'Duration', 'Error'],
          rows.map((r) => ({
            testid: 'sync-row',
            attrs: { 'data-outcome': r.outcome, 'data-cloud': r.target },
            cells: [when(r.at), r.target, `${r.operation} (${r.direction})`, r.device, String(r.count),
              String(r.conflicts), badge(r.outcome), `${r.duration_ms} ms`, r.error ? h('span', { class: 'bad' }, r.error) : null],
          })))
        : h('p', { class: 'empty', testid: 'sync-empty' }, 'No sync log rows match.'));
      const newer = () => { before = above.pop() ?? null; refreshNow(); };
      const older = () => { above.push(before); before = rows[rows.length - 1].id; refreshNow(); };
      pager.replaceChildren(
        h('button', { class: 'secondary', testid: 'sync-newer', disabled: before === null, onclick: newer }, 'Newer'),
        h('button', { class: 'secondary', testid: 'sync-older', disabled: rows.length < limit, onclick: older }, 'Older'),
      );
    },
  };
}

// ---------------------------------------------------------------------------------------
// Configuration

function configScreen(root) {
  const toml = h('pre', { class: 'config', testid: 'config-toml' }, 'Loading…');
  const tests = CLOUDS.map((cloud) => {
    const out = h('p', { class: 'test-result', testid: `test-result-${cloud}` });
    const button = h('button', { testid: `test-${cloud}` }, 'Test connection');
    button.addEventListener('click', async () => {
      button.disabled = true;
      out.className = 'test-result';
      out.textContent = 'Testing…';
      try {
        const r = await api('POST', `/api/v1/clouds/${cloud}/test`);
        out.className = `test-result ${r.ok ? 'good' : 'bad'}`;
        out.dataset.ok = String(r.ok);
        out.textContent = [r.ok ? 'OK' : 'Failed', `${Math.round(r.latency_ms)} ms`, r.request,
          r.status == null ? 'no HTTP status' : `HTTP ${r.status}`, r.error].filter(Boolean).join(' · ');
      } catch (e) {
        out.className = 'test-result bad';
        out.dataset.ok = 'false';
        out.textContent = e.status === 401 ? '' : `Not tested: ${e.message}`;
      } finally {
        button.disabled = false;
      }
    });
    return h('article', { class: 'card', testid: `test-${cloud}-card` },
      h('h2', {}, cloud === 'golioth' ? 'Golioth' : 'NetNeural'), button, out);
  });
  root.append(h('div', { class: 'head' }, h('h1', {}, 'Configuration')),
    h('div', { class: 'cards' }, tests),
    h('article', { class: 'card' }, h('h2', {}, 'Effective configuration'),
      h('p', { class: 'muted' }, 'As `nn-gateway check-config` prints it; secrets are left out by the gateway.'), toml));
  return {
    poll: false, // The configuration changes only with a restart or SIGHUP.
    async refresh() {
      const r = await api('GET', '/api/v1/config');
      toml.textContent = r.toml;
    },
  };
}

const SCREENS = {
  overview: overviewScreen,
  devices: devicesScreen,
  device: deviceScreen,
  conflicts: conflictsScreen,
  sync: syncScreen,
  config: configScreen,
};

$('forget').hidden = !token;
route();
