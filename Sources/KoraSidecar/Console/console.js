// The delivery console: one page over the sidecar's admin API, routed by the URL hash.
// Every value from the API is untrusted (bodies and errors come from Kora, services and the
// network), so the DOM is built with createElement and text nodes only: nothing is parsed as HTML.
'use strict';

const TOKEN_KEY = 'kora-sidecar.adminToken';
const PAGE_SIZE = 25;
const OVERVIEW_EVERY_MS = 5000;
const PENDING_EVERY_MS = 2000;

const $ = (id) => document.getElementById(id);
const statusBox = $('status');
const view = $('view');

let routeSeq = 0;        // bumped on every navigation: answers for an older view are dropped
let refreshTimer = null;
let lastListHash = '#/deliveries';
let serviceNames = null; // for the filter's suggestions, loaded once per page

// ---------------------------------------------------------------------------------------------
// DOM helpers: strings always become text nodes, attributes are set one by one.

function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

function s(tag, attrs, ...children) {
  return fill(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
}

function fill(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function say(text, kind = 'ok') {
  statusBox.className = 'status ' + kind;
  statusBox.textContent = text;
}

function clearStatus() {
  statusBox.className = 'status';
  statusBox.textContent = '';
}

function sayError(error) {
  say(describe(error), 'error');
}

function describe(error) {
  if (error instanceof ApiError) return error.code ? `${error.code}: ${error.message}` : error.message;
  return `The sidecar did not answer (${error.message}).`;
}

// Times are shown in UTC, as the logs, the API and the since/until filters write them.
function utc(iso) {
  if (!iso) return '—';
  const date = new Date(iso);
  if (isNaN(date)) return String(iso);
  return date.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

function timeCell(iso) {
  return iso ? h('time', { datetime: iso }, utc(iso)) : '—';
}

function age(iso) {
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 120) return `${seconds} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function table(caption, headings, rows, empty) {
  const body = rows.length ? rows : [h('tr', {}, h('td', { colspan: headings.length, class: 'empty' }, empty))];
  return h('div', { class: 'scroll', tabindex: 0, role: 'region', 'aria-label': caption },
    h('table', {}, h('caption', {}, caption),
      h('thead', {}, h('tr', {}, headings.map((x) => h('th', { scope: 'col' }, x)))),
      h('tbody', {}, body)));
}

function definitions(pairs) {
  return h('dl', { class: 'facts' }, pairs.map(([term, value]) => [h('dt', {}, term), h('dd', {}, value ?? '—')]));
}

function badge(status) {
  return h('span', { class: `badge s-${String(status).replace(/[^a-z_]/gi, '')}` }, status);
}

// ---------------------------------------------------------------------------------------------
// The admin API. The token lives in sessionStorage only: never in a URL, a cookie or the hash.

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

class SignInNeeded extends Error {}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(method, path, params, body) {
  const query = params ? new URLSearchParams(Object.entries(params).filter(([, v]) => v != null && v !== '')) : null;
  const headers = { Accept: 'application/json' };
  const sent = token(); // judged per request: two answers may come back 401 after one sign-in
  if (sent) headers.Authorization = `Bearer ${sent}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path + (query && [...query].length ? `?${query}` : ''), {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store', credentials: 'omit', redirect: 'error',
  });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { /* not JSON: reported below */ }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn(sent ? `${json?.code || 'UNAUTHORIZED'}: ${json?.error || 'The token was refused.'}` : null);
    throw new SignInNeeded();
  }
  if (!response.ok) {
    throw new ApiError(response.status, json?.code || `HTTP ${response.status}`, json?.error || 'The sidecar refused the request.');
  }
  if (json === null) throw new ApiError(response.status, 'BAD_ANSWER', 'The sidecar sent an answer that is not JSON.');
  return json;
}

// ---------------------------------------------------------------------------------------------
// Signing in and out

function showSignIn(error) {
  stopRefresh();
  routeSeq++;
  view.replaceChildren();
  view.hidden = true;
  $('nav').hidden = true;
  $('signout').hidden = true;
  $('signin').hidden = false;
  if (error) say(error, 'error');
  else say('This sidecar needs its admin token.', 'info');
  $('token').focus();
}

function showApp() {
  $('signin').hidden = true;
  view.hidden = false;
  $('nav').hidden = false;
  $('signout').hidden = token() === null;
}

$('signin-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const value = $('token').value.trim();
  $('token').value = '';
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  say('Signing in…', 'info');
  route({ focus: true, signedIn: true });
});

$('signout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  serviceNames = null;
  showSignIn(null);
  say('Signed out.', 'info');
});

// ---------------------------------------------------------------------------------------------
// Confirmation: a modal <dialog>; Escape cancels (the browser fires `cancel`, then `close`).

function confirmAction(title, text, confirmLabel) {
  const dialog = $('confirm');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = confirmLabel;
  dialog.returnValue = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'confirm'), { once: true });
    dialog.showModal();
    $('confirm-cancel').focus(); // the first button: a stray Enter never confirms
  });
}

$('confirm-ok').addEventListener('click', () => $('confirm').close('confirm'));
$('confirm-cancel').addEventListener('click', () => $('confirm').close('cancel'));

// Runs an action, announcing its answer or its error; the caller re-renders afterwards.
async function act(button, work) {
  button.disabled = true;
  try {
    const message = await work();
    if (message) say(message, 'ok');
    return true;
  } catch (error) {
    if (!(error instanceof SignInNeeded)) sayError(error);
    return false;
  } finally {
    button.disabled = false;
  }
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

// ---------------------------------------------------------------------------------------------
// Routing: #/overview, #/deliveries?filters, #/deliveries/42, #/quarantine, #/unrouted, #/erase

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/overview';
  const [path, query = ''] = raw.split('?');
  return { parts: path.split('/').filter(Boolean).map(decodePart), params: new URLSearchParams(query) };
}

// A part of an address someone typed or pasted may not decode (`%E0`): it is then taken as it is,
// and the view says it found nothing, instead of the page staying blank.
function decodePart(part) {
  try { return decodeURIComponent(part); } catch { return part; }
}

function hashFor(path, params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v != null && v !== '')).toString();
  return `#${path}${query ? `?${query}` : ''}`;
}

function stopRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = null;
}

async function route({ focus = false, signedIn = false } = {}) {
  stopRefresh();
  const seq = ++routeSeq;
  const { parts, params } = parseHash();
  const name = parts[0] || 'overview';
  const views = { overview: overviewView, deliveries: parts[1] ? deliveryView : deliveriesView,
    quarantine: quarantineView, unrouted: unroutedView, erase: eraseView };
  const render = Object.prototype.hasOwnProperty.call(views, name) ? views[name] : notFoundView;
  for (const link of document.querySelectorAll('#nav a')) {
    if (link.dataset.view === name) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  try {
    const content = await render(params, parts, seq);
    if (seq !== routeSeq) return;
    showApp();
    view.replaceChildren(content);
    document.title = `${view.querySelector('h1')?.textContent || 'Console'} · kora-sidecar`;
    if (signedIn) say('Signed in.', 'ok');
    if (focus) (view.querySelector('h1') || view).focus();
  } catch (error) {
    if (error instanceof SignInNeeded || seq !== routeSeq) return;
    showApp();
    view.replaceChildren(h('h1', { tabindex: -1 }, 'Could not load this view'), h('p', { class: 'problem' }, describe(error)));
    sayError(error);
  }
}

// Re-renders the current view in place every `ms`, keeping keyboard focus where it was.
function refreshEvery(ms, seq, render) {
  refreshTimer = setTimeout(async () => {
    if (seq !== routeSeq) return;
    const focused = document.activeElement;
    const key = focused && view.contains(focused) ? focusKey(focused) : null;
    try {
      const content = await render();
      if (seq !== routeSeq) return;
      view.replaceChildren(content);
      if (key) [...view.querySelectorAll('a, button, input, select, [tabindex]')].find((el) => focusKey(el) === key)?.focus();
    } catch (error) {
      if (error instanceof SignInNeeded || seq !== routeSeq) return;
      sayError(error);
    }
  }, ms);
}

function focusKey(el) {
  return `${el.tagName}|${el.getAttribute('href') || ''}|${el.id || ''}|${el.textContent.trim()}`;
}

function notFoundView() {
  return h('section', {}, h('h1', { tabindex: -1 }, 'No such view'),
    h('p', {}, h('a', { href: '#/overview' }, 'Go to the overview')));
}

// ---------------------------------------------------------------------------------------------
// Overview

const STATE_LABELS = { closed: 'delivering', open: 'paused', half_open: 'probing' };
const KNOWN_RESULTS = ['accepted', 'duplicate', 'unrouted', 'unverified', 'INVALID_PAYLOAD'];

// A stable colour class per result key: known keys have their own, others are hashed into six.
function resultClass(key) {
  if (KNOWN_RESULTS.includes(key)) return `c-${key.toLowerCase()}`;
  let hash = 0;
  for (const ch of key) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return `c-x${hash % 6}`;
}

async function overviewView(params, parts, seq) {
  const data = await api('GET', '/admin/overview');
  refreshEvery(OVERVIEW_EVERY_MS, seq, () => overviewView(params, parts, seq));
  serviceNames = (data.services || []).map((x) => x.name);
  const services = data.services || [];
  return h('section', {},
    h('h1', { tabindex: -1 }, 'Overview'),
    h('p', { class: 'meta' }, `Refreshed every 5 s; last at ${utc(new Date().toISOString())}.`),
    h('div', { class: 'cards' },
      h('div', { class: `card ${data.ready ? 'good' : 'bad'}` }, h('h2', {}, 'Readiness'),
        h('p', { class: 'big' }, data.ready ? 'Ready' : 'Not ready'),
        data.readinessProblem ? h('p', {}, data.readinessProblem) : null),
      h('div', { class: 'card' }, h('h2', {}, 'Delivery mode'), h('p', { class: 'big' }, data.deliveryMode || '—')),
      h('div', { class: 'card' }, h('h2', {}, 'Quarantined'),
        h('p', { class: 'big' }, h('a', { href: '#/quarantine' }, String(data.quarantined ?? '—')))),
      h('div', { class: 'card' }, h('h2', {}, 'Unrouted'),
        h('p', { class: 'big' }, h('a', { href: '#/unrouted' }, String(data.unrouted ?? '—'))))),
    h('h2', {}, 'Webhooks per minute, last hour'),
    chart(data.webhooksPerMinute || []),
    table('Services', ['Service', 'State', 'Failures in a row', 'Paused until', 'Pending', 'Oldest pending', 'Delivered', 'Dead'],
      services.map((x) => {
        const state = STATE_LABELS[x.state] || x.state;
        const filter = (status) => hashFor('/deliveries', { status, service: x.name });
        return h('tr', {},
          h('th', { scope: 'row' }, h('a', { href: hashFor('/deliveries', { service: x.name }) }, x.name)),
          h('td', {}, h('span', { class: `badge st-${String(state).replace(/[^a-z_]/gi, '')}` }, state)),
          h('td', { class: 'num' }, x.consecutiveFailures ?? '—'),
          h('td', {}, timeCell(x.pausedUntil)),
          h('td', { class: 'num' }, h('a', { href: filter('pending') }, String(x.pending ?? 0))),
          h('td', {}, x.oldestPendingAt ? [timeCell(x.oldestPendingAt), ` (${age(x.oldestPendingAt)} ago)`] : '—'),
          h('td', { class: 'num' }, h('a', { href: filter('delivered') }, String(x.delivered ?? 0))),
          h('td', { class: 'num' }, h('a', { href: filter('dead') }, String(x.dead ?? 0))));
      }), 'No service receives events.'));
}

// Stacked bars in plain SVG: one column per minute, oldest on the left.
function chart(minutes) {
  const keys = [...new Set(minutes.flatMap((m) => Object.keys(m.counts || {})))]
    .sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  const totals = Object.fromEntries(keys.map((k) => [k, minutes.reduce((sum, m) => sum + (m.counts?.[k] || 0), 0)]));
  const max = Math.max(1, ...minutes.map((m) => Object.values(m.counts || {}).reduce((a, b) => a + b, 0)));
  const width = 10 * Math.max(minutes.length, 1);
  const bars = minutes.map((m, i) => {
    let y = 100;
    const rects = keys.filter((k) => m.counts?.[k]).map((k) => {
      const height = (m.counts[k] / max) * 100;
      y -= height;
      return s('rect', { x: i * 10 + 1, y, width: 8, height, class: resultClass(k) });
    });
    const label = keys.filter((k) => m.counts?.[k]).map((k) => `${k} ${m.counts[k]}`).join(', ') || 'none';
    return s('g', {}, s('title', {}, `${utc(m.minute)}: ${label}`), s('rect', { x: i * 10, y: 0, width: 10, height: 100, class: 'hit' }), rects);
  });
  const summary = keys.length ? keys.map((k) => `${k} ${totals[k]}`).join(', ') : 'no webhooks';
  return h('figure', { class: 'chart' },
    s('svg', { viewBox: `0 0 ${width} 100`, preserveAspectRatio: 'none', role: 'img',
      'aria-label': `Webhooks in the last hour by result: ${summary}. Busiest minute: ${max}.` },
    s('line', { x1: 0, y1: 100, x2: width, y2: 100, class: 'axis' }), bars),
    h('div', { class: 'axis-labels' },
      h('span', {}, minutes.length ? utc(minutes[0].minute) : ''), h('span', {}, `highest: ${max} a minute`),
      h('span', {}, minutes.length ? utc(minutes[minutes.length - 1].minute) : '')),
    h('figcaption', {}, h('ul', { class: 'legend' }, keys.length
      ? keys.map((k) => h('li', {}, h('span', { class: `swatch ${resultClass(k)}`, 'aria-hidden': 'true' }), `${k}: ${totals[k]}`))
      : h('li', {}, 'No webhooks in the last hour.'))));
}

function rank(key) {
  const i = KNOWN_RESULTS.indexOf(key);
  return i < 0 ? KNOWN_RESULTS.length : i;
}

// ---------------------------------------------------------------------------------------------
// Deliveries

const FILTERS = [
  ['service', 'Service', 'app'], ['type', 'Event type', 'verification.completed'],
  ['verification', 'Verification id', 'ver_…'], ['since', 'Since', '24h or 2026-11-30T07:00:00Z'],
  ['until', 'Until', '30m or 2026-11-30T08:00:00Z'],
];

async function deliveriesView(params) {
  lastListHash = location.hash || '#/deliveries';
  const filters = Object.fromEntries(['status', ...FILTERS.map(([k]) => k)].map((k) => [k, params.get(k) || '']));
  const [data, names] = await Promise.all([
    api('GET', '/admin/deliveries', { ...filters, limit: PAGE_SIZE, before: params.get('before') }),
    serviceNames ? serviceNames : api('GET', '/admin/services').then((x) => x.services.map((y) => y.name), () => []),
  ]);
  serviceNames = names;
  const form = h('form', { class: 'filters', 'aria-label': 'Filter deliveries', onsubmit: (event) => {
    event.preventDefault();
    const values = Object.fromEntries([...new FormData(form)].map(([k, v]) => [k, String(v).trim()]));
    location.hash = hashFor('/deliveries', values);
  } },
  h('label', {}, 'Status', h('select', { name: 'status' },
    ['', 'pending', 'delivered', 'dead'].map((v) => h('option', { value: v, selected: v === filters.status }, v || 'any')))),
  FILTERS.map(([k, label, hint]) => h('label', {}, label,
    h('input', { name: k, value: filters[k], placeholder: hint, list: k === 'service' ? 'service-names' : null, spellcheck: 'false' }))),
  h('datalist', { id: 'service-names' }, names.map((n) => h('option', { value: n }))),
  h('div', { class: 'buttons' }, h('button', { type: 'submit' }, 'Apply'), h('a', { href: '#/deliveries' }, 'Clear filters')));

  const rows = (data.deliveries || []).map((d) => h('tr', {},
    h('td', {}, h('a', { href: `#/deliveries/${encodeURIComponent(d.id)}` }, String(d.id))),
    h('td', {}, timeCell(d.createdAt)),
    h('td', {}, d.service),
    h('td', {}, d.eventType),
    h('td', {}, badge(d.status)),
    h('td', { class: 'num' }, d.attempts),
    h('td', { class: 'error-text' }, [d.lastStatusCode ?? '', d.lastError ? ` ${d.lastError}` : ''].join('').trim() || '—'),
    h('td', {}, d.verificationId ? h('a', { href: hashFor('/deliveries', { verification: d.verificationId }) }, d.verificationId) : '—')));

  const paging = h('nav', { class: 'paging', 'aria-label': 'Pages' },
    params.get('before') ? h('a', { href: hashFor('/deliveries', filters) }, '« Newest') : null,
    data.next != null ? h('a', { href: hashFor('/deliveries', { ...filters, before: data.next }) }, 'Older »') : null);

  const retryable = filters.status === 'dead' || filters.status === 'delivered';
  const retry = h('button', { type: 'button', onclick: () => retryByFilter(retry, filters) },
    `Send these ${filters.status} deliveries again…`);
  return h('section', {},
    h('h1', { tabindex: -1 }, 'Deliveries'),
    form,
    h('div', { class: 'toolbar' },
      retryable ? retry : h('p', { class: 'meta' }, 'To send deliveries again by filter, choose status dead or delivered.'),
      h('button', { type: 'button', class: 'quiet', onclick: () => route() }, 'Refresh')),
    table('Deliveries, newest first', ['ID', 'Created (UTC)', 'Service', 'Event type', 'Status', 'Attempts', 'Last answer', 'Verification'],
      rows, 'No deliveries match.'),
    paging);
}

async function retryByFilter(button, filters) {
  await act(button, async () => {
    const dry = await api('POST', '/admin/deliveries/retry', { ...filters, dryRun: 'true' });
    const count = dry.wouldRequeue ?? 0;
    const gone = dry.bodyGone ? ` ${plural(dry.bodyGone, 'of them has', 'of them have')} no body left and cannot be sent.` : '';
    if (count === 0 && !dry.bodyGone) return `No ${filters.status} delivery matches these filters: nothing to send.`;
    const yes = await confirmAction('Send deliveries again?',
      `${plural(count, `${filters.status} delivery`, `${filters.status} deliveries`)} matching these filters would be queued again, due now.${gone}`,
      `Send ${count} again`);
    if (!yes) return 'Cancelled: nothing was sent.';
    // The deliveries counted, not those of events accepted since: the dry run's bounds.
    const bounds = { until: dry.until, ...(dry.since ? { since: dry.since } : {}) };
    const done = await api('POST', '/admin/deliveries/retry', { ...filters, ...bounds });
    route();
    return `Queued again: ${plural(done.requeued ?? 0, 'delivery', 'deliveries')}.${done.bodyGone ? ` ${done.bodyGone} without a body could not be.` : ''}`;
  });
}

const BODY_STATES = {
  expired: 'The body was deleted when its retention period ended (storage.payloadRetention or deadRetention).',
  erased: 'The body was erased by an operator.',
  unreadable: 'The body is encrypted with a key this sidecar does not have configured.',
};

// `indent` re-indents JSON for reading; a quarantined payload is evidence and is shown as received.
function bodyBlock(body, state, indent) {
  if (body == null) return h('p', { class: 'meta' }, BODY_STATES[state] || `No body (${state || 'not kept'}).`);
  return h('pre', { class: 'body', tabindex: 0 }, indent ? indentJSON(body) : body);
}

// Indents JSON by its punctuation without parsing its values, so that what is shown is what was
// sent: numbers beyond 2^53 keep their digits and a repeated key stays repeated (a parse and
// stringify would change both). Text that is not JSON, above a megabyte, nested deeper than any
// event, or whose indenting would grow past four megabytes, is shown as it is.
const INDENT_LIMIT = { bytes: 1 << 20, depth: 64, output: 4 << 20 };
function indentJSON(text) {
  if (text.length > INDENT_LIMIT.bytes) return text;
  try { JSON.parse(text); } catch { return text; }
  const out = [];
  let depth = 0;
  let inString = false;
  let escaped = false;
  let size = 0;
  const newline = () => {
    size += 1 + 2 * depth;
    return `\n${'  '.repeat(depth)}`;
  };
  for (const c of text) {
    if (inString) {
      out.push(c);
      if (escaped) escaped = false;
      else if (c === '\\') escaped = true;
      else if (c === '"') inString = false;
    } else if (c === '"') {
      inString = true;
      out.push(c);
    } else if (c === '{' || c === '[') {
      depth += 1;
      if (depth > INDENT_LIMIT.depth) return text;
      out.push(c, newline());
    } else if (c === '}' || c === ']') {
      depth -= 1;
      out.push(newline(), c);
    } else if (c === ',') {
      out.push(c, newline());
      if (size > INDENT_LIMIT.output) return text;
    } else if (c === ':') {
      out.push(': ');
    } else if (!' \t\n\r'.includes(c)) {
      out.push(c);
    }
  }
  // An empty object or array stays on one line, as JSON.stringify writes it.
  return out.join('').replace(/([[{])\n\s*([\]}])/g, '$1$2');
}

async function deliveryView(params, parts, seq) {
  const id = parts[1];
  const d = await api('GET', `/admin/deliveries/${encodeURIComponent(id)}`);
  // A pending delivery is about to change: follow it until it is delivered or dead.
  if (d.status === 'pending') refreshEvery(PENDING_EVERY_MS, seq, () => deliveryView(params, parts, seq));
  const retry = h('button', { type: 'button', onclick: () => act(retry, async () => {
    const yes = await confirmAction('Retry this delivery?',
      `Delivery ${d.id} of ${d.eventType} to ${d.service} is queued again, due now.`, 'Retry');
    if (!yes) return 'Cancelled: nothing was sent.';
    const done = await api('POST', `/admin/deliveries/${encodeURIComponent(d.id)}/retry`);
    route();
    return `Delivery ${done.requeued ?? d.id} is queued again.`;
  }) }, 'Retry this delivery…');
  const replay = h('button', { type: 'button', onclick: () => act(replay, async () => {
    const yes = await confirmAction(`Replay to ${d.service}?`,
      `Event ${d.eventId} is sent again to ${d.service}, with the same webhook-id.`, 'Replay');
    if (!yes) return 'Cancelled: nothing was sent.';
    const done = await api('POST', `/admin/events/${encodeURIComponent(d.eventId)}/replay`, { service: d.service });
    route();
    return `Event ${done.eventId ?? d.eventId}: ${plural(done.requeued ?? 0, 'delivery', 'deliveries')} queued again.`;
  }) }, `Replay event to ${d.service}…`);
  return h('section', {},
    h('p', {}, h('a', { href: lastListHash }, '« Deliveries')),
    h('h1', { tabindex: -1 }, `Delivery ${d.id} `, badge(d.status)),
    definitions([
      ['Event', d.eventId], ['Event type', d.eventType], ['Service', d.service], ['Status', d.status],
      ['Attempts', String(d.attempts)], ['Next attempt', timeCell(d.nextAttemptAt)],
      ['Last status code', d.lastStatusCode == null ? null : String(d.lastStatusCode)], ['Last error', d.lastError],
      ['Verification', d.verificationId], ['Created', timeCell(d.createdAt)], ['Updated', timeCell(d.updatedAt)],
    ]),
    h('div', { class: 'toolbar' },
      d.status === 'pending' || d.status === 'dead' ? retry : null,
      d.status === 'delivered' || d.status === 'dead' ? replay : null),
    table('Attempts', ['Attempt', 'Status code', 'At (UTC)', 'Duration', 'Error'],
      (d.history || []).map((a) => h('tr', {},
        h('td', { class: 'num' }, a.attempt), h('td', { class: 'num' }, a.statusCode ?? '—'), h('td', {}, timeCell(a.at)),
        h('td', { class: 'num' }, a.durationMilliseconds == null ? '—' : `${a.durationMilliseconds} ms`),
        h('td', { class: 'error-text' }, a.error ?? '—'))),
      'No attempt yet.'),
    h('h2', {}, 'Body as the service received it'),
    d.body == null ? null : h('p', { class: 'meta' }, 'Re-indented here for reading: the same JSON, not the same bytes.'),
    bodyBlock(d.body, d.bodyState, true));
}

// ---------------------------------------------------------------------------------------------
// Quarantine and unrouted

function olderLink(path, data) {
  return h('nav', { class: 'paging', 'aria-label': 'Pages' },
    parseHash().params.get('before') ? h('a', { href: `#${path}` }, '« Newest') : null,
    data.next != null ? h('a', { href: hashFor(path, { before: data.next }) }, 'Older »') : null);
}

async function quarantineView(params) {
  const data = await api('GET', '/admin/deliveries', { status: 'quarantined', limit: PAGE_SIZE, before: params.get('before') });
  const items = data.deliveries || [];
  return h('section', {},
    h('h1', { tabindex: -1 }, 'Quarantine'),
    h('p', { class: 'meta' }, 'Payloads that were signed but could not be read as an event. They are kept for inspection, not delivered.'),
    items.length ? items.map((q) => h('article', { class: 'payload' },
      h('h2', {}, `${q.id} · received ${utc(q.receivedAt)}`),
      definitions([['Reason', q.reason], ['Signature verified', q.signatureVerified ? 'yes' : 'no']]),
      h('details', {}, h('summary', {}, 'Headers'),
        definitions(Object.entries(q.headers || {}).map(([k, v]) => [k, String(v)]))),
      // Closed until asked for: a page of them would otherwise show every body's identity data at once.
      h('details', { class: 'payload-body' }, h('summary', {}, 'Body'), bodyBlock(q.body, q.bodyState, false))))
      : h('p', {}, 'Nothing is quarantined.'),
    olderLink('/quarantine', data));
}

async function unroutedView(params) {
  const data = await api('GET', '/admin/deliveries', { status: 'unrouted', limit: PAGE_SIZE, before: params.get('before') });
  const reroute = h('button', { type: 'button', onclick: () => act(reroute, async () => {
    const dry = await api('POST', '/admin/deliveries/retry', { status: 'unrouted', dryRun: 'true' });
    const yes = await confirmAction('Route unrouted events again?',
      `With the current configuration ${plural(dry.routedEvents ?? 0, 'event', 'events')} would get ${plural(dry.deliveries ?? 0, 'delivery', 'deliveries')}; ${plural(dry.stillUnrouted ?? 0, 'event', 'events')} would still match no service.`,
      'Route again');
    if (!yes) return 'Cancelled: nothing was routed.';
    const done = await api('POST', '/admin/deliveries/retry', { status: 'unrouted' });
    route();
    return `Routed ${plural(done.routedEvents ?? 0, 'event', 'events')} into ${plural(done.deliveries ?? 0, 'delivery', 'deliveries')}; ${done.stillUnrouted ?? 0} still unrouted.`;
  }) }, 'Route again…');
  return h('section', {},
    h('h1', { tabindex: -1 }, 'Unrouted events'),
    h('p', { class: 'meta' }, 'Accepted events that no service takes. After adding or widening a service, route them again.'),
    h('div', { class: 'toolbar' }, reroute),
    table('Unrouted events, newest first', ['ID', 'Received (UTC)', 'Event', 'Event type', 'Verification', 'Signature verified'],
      (data.deliveries || []).map((u) => h('tr', {},
        h('td', {}, u.id), h('td', {}, timeCell(u.receivedAt)), h('td', {}, u.eventId), h('td', {}, u.eventType),
        h('td', {}, u.verificationId ?? '—'), h('td', {}, u.signatureVerified ? 'yes' : 'no'))),
      'No unrouted events.'),
    olderLink('/unrouted', data));
}

// ---------------------------------------------------------------------------------------------
// Erase

function eraseView() {
  const result = h('div', { class: 'result' });
  const kind = h('select', { id: 'erase-kind', name: 'kind' },
    h('option', { value: 'verificationId' }, 'Verification id'), h('option', { value: 'externalId' }, 'External id'));
  const value = h('input', { id: 'erase-value', name: 'value', required: true, spellcheck: 'false', autocomplete: 'off' });
  const submit = h('button', { type: 'submit', class: 'danger' }, 'Erase…');
  const form = h('form', { class: 'filters', 'aria-label': 'Erase a verification', onsubmit: (event) => {
    event.preventDefault();
    const id = value.value.trim();
    if (!id) return value.focus();
    const label = kind.value === 'verificationId' ? `verification ${id}` : `external id ${id}`;
    act(submit, async () => {
      const yes = await confirmAction('Erase this data?',
        `Every stored event, delivery body, quarantined payload, origin and idempotency key of ${label} is erased. This cannot be undone.`,
        'Erase');
      if (!yes) return 'Cancelled: nothing was erased.';
      const done = await api('POST', '/admin/erase', undefined, { [kind.value]: id });
      value.value = '';
      result.replaceChildren(h('h2', {}, `Erased: ${label}`), definitions([
        ['Verification ids', (done.verificationIds || []).join(', ') || 'none found'],
        ['Events', String(done.events ?? 0)], ['Deliveries', String(done.deliveries ?? 0)],
        ['Quarantined payloads', String(done.quarantined ?? 0)], ['Origins', String(done.origins ?? 0)],
        ['Idempotency keys', String(done.idempotencyKeys ?? 0)],
      ]));
      return `Erased ${label}: ${plural(done.events ?? 0, 'event', 'events')}, ${plural(done.deliveries ?? 0, 'delivery', 'deliveries')}.`;
    });
  } },
  h('label', { for: 'erase-kind' }, 'Erase by'), kind,
  h('label', { for: 'erase-value' }, 'Id'), value,
  h('div', { class: 'buttons' }, submit));
  return h('section', {},
    h('h1', { tabindex: -1 }, 'Erase a verification'),
    h('p', {}, "Removes what the sidecar stores about one person's verification: by Kora's verification id, or by your own external id (every verification of that subject)."),
    form, result);
}

// ---------------------------------------------------------------------------------------------

// A message belongs to the view it was said in: moving to another view clears it.
window.addEventListener('hashchange', () => {
  clearStatus();
  route({ focus: true });
});
route();
