// The console in a real browser: Debian's headless Chromium driven by playwright-core, against
// a real daemon that tests/console.rs started (with real Mosquitto and the fake clouds).
//
// The Rust test plays the devices and the clouds. When this script needs something done on
// that side it prints one line `step NAME JSON` on stdout and waits for one line on stdin:
// `ok JSON` (go on, with what the Rust side has to say) or `fail MESSAGE`. Everything else it
// prints is a comment. It exits 0 when every check passed, 1 at the first that did not
// (with a screenshot `failure.png` of that moment).
//
// Environment (set by tests/console.rs):
//   CONSOLE_URL          the daemon's API/console base URL, e.g. http://127.0.0.1:41234
//   CONSOLE_TOKEN        the API token
//   CONSOLE_SECRETS      comma-separated secrets that must never appear on a screen
//   CONSOLE_DEVICE       the device whose desired document is edited
//   CONSOLE_SCREENSHOTS  the folder for the screenshots
//   CHROMIUM             the browser (default /usr/bin/chromium)
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};
const BASE = env('CONSOLE_URL');
const TOKEN = env('CONSOLE_TOKEN');
const SECRETS = env('CONSOLE_SECRETS', '').split(',').filter(Boolean);
const DEVICE = env('CONSOLE_DEVICE');
const SHOTS = env('CONSOLE_SCREENSHOTS');
const WAIT = 15000;
mkdirSync(SHOTS, { recursive: true });

// ---- talking to the Rust side ----
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function step(name, data = {}) {
  console.log(`step ${name} ${JSON.stringify(data)}`);
  const { value, done } = await lines.next();
  if (done) throw new Error(`the test hung up during step ${name}`);
  const [word, ...rest] = value.split(' ');
  if (word !== 'ok') throw new Error(`step ${name} failed on the Rust side: ${rest.join(' ')}`);
  return rest.length ? JSON.parse(rest.join(' ')) : {};
}
const say = (text) => console.log(`# ${text}`);
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

// ---- page helpers ----
const tid = (page, id) => page.locator(`[data-testid="${id}"]`);
async function text(page, id) {
  return (await tid(page, id).first().textContent()) ?? '';
}
/** Waits until the element's text matches `re` (the console refreshes every 2 s). */
async function until(page, id, re, timeout = WAIT) {
  const loc = tid(page, id).first();
  const deadline = Date.now() + timeout;
  let last = '';
  for (;;) {
    const now = await loc.textContent({ timeout: Math.max(1, deadline - Date.now()) }).catch(() => null);
    if (now !== null) last = now;
    if (now !== null && re.test(now)) return now;
    if (Date.now() > deadline) throw new Error(`${id}: ${JSON.stringify(last)} never matched ${re} within ${timeout} ms`);
    await page.waitForTimeout(100);
  }
}
async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
  say(`screenshot ${name}.png`);
}
async function go(page, hash, screen) {
  await page.evaluate((h) => { location.hash = h; }, hash);
  await tid(page, `screen-${screen}`).waitFor({ timeout: WAIT });
}
async function giveToken(page, token) {
  await tid(page, 'token-form').waitFor({ state: 'visible', timeout: WAIT });
  await tid(page, 'token-input').fill(token);
  await tid(page, 'token-submit').click();
}
/** Nothing on the page is wider than the window (no horizontal scrolling). */
async function fitsWidth(page, what) {
  const [scroll, width] = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  check(scroll <= width, `${what}: the page is ${scroll} px wide in a ${width} px window`);
}
async function noSecrets(page, what) {
  const body = await page.evaluate(() => document.body.innerText);
  for (const s of SECRETS) check(!body.includes(s), `${what} shows a secret`);
}

// ---- the scenarios ----
async function tokenIsAskedForAtTheFirst401(page) {
  await page.goto(BASE);
  await giveToken(page, 'not-the-token');
  await until(page, 'banner-text', /refused this token/);
  check(await tid(page, 'token-form').isVisible(), 'the form is asked again after a wrong token');
  await shot(page, 'token');
  await giveToken(page, TOKEN);
  await tid(page, 'screen-overview').waitFor({ timeout: WAIT });
  check(!(await tid(page, 'token-form').isVisible()), 'the form is gone with the right token');
}

async function overviewShowsACloudGoingOfflineAndBack(page) {
  await go(page, '#/overview', 'overview');
  await until(page, 'cloud-state-golioth', /^online$/);
  await until(page, 'cloud-state-netneural', /^online$/);
  await until(page, 'mqtt-state', /^connected$/);
  await until(page, 'disk-use', /database .* WAL/);
  await until(page, 'ingest-rate', /^\d+\.\d messages\/s$/);
  await shot(page, 'overview');
  await step('golioth-down');
  await until(page, 'cloud-state-golioth', /^offline$/);
  await until(page, 'cloud-error-golioth', /503/);
  check(/^online$/.test(await text(page, 'cloud-state-netneural')), 'NetNeural stays online');
  await shot(page, 'overview-golioth-offline');
  await step('golioth-up');
  await until(page, 'cloud-state-golioth', /^online$/);
  say('the overview showed Golioth offline and back online');

  // The gateway going away shows as such, and the banner goes when it answers again.
  await page.route('**/api/v1/**', (route) => route.abort('connectionrefused'));
  await until(page, 'banner-text', /Gateway unreachable/);
  await page.unroute('**/api/v1/**');
  await tid(page, 'banner').waitFor({ state: 'hidden', timeout: WAIT });

  // A hidden tab stops polling, and a visible one starts again at once.
  let polls = 0;
  const count = (req) => { if (req.url().includes('/api/v1/status')) polls += 1; };
  page.on('request', count);
  const hide = (hidden) => page.evaluate((v) => {
    Object.defineProperty(document, 'hidden', { value: v, configurable: true });
    document.dispatchEvent(new Event('visibilitychange'));
  }, hidden);
  await hide(true);
  await page.waitForTimeout(300); // a poll already on its way may land
  polls = 0;
  await page.waitForTimeout(3000); // longer than a poll's interval
  check(polls === 0, `a hidden tab polled ${polls} times`);
  await hide(false);
  await page.waitForTimeout(500);
  check(polls >= 1, 'a tab shown again polls at once');
  page.off('request', count);

  await tid(page, 'sync-now').click();
  await until(page, 'banner-text', /Sync run requested/);
}

async function desiredEditedInTheConsoleReachesTheDevice(page) {
  await go(page, '#/devices', 'devices');
  await tid(page, 'device-search').fill(DEVICE);
  const row = page.locator(`[data-testid="device-row"][data-key="${DEVICE}"]`);
  await row.waitFor({ timeout: WAIT });
  await until(page, 'device-list', new RegExp(DEVICE));
  await shot(page, 'devices');
  await tid(page, 'device-search').fill('no-such-device-anywhere');
  await tid(page, 'devices-empty').waitFor({ timeout: WAIT });
  await tid(page, 'device-search').fill(DEVICE);
  await row.locator('[data-testid="device-link"]').click();
  await tid(page, 'screen-device').waitFor({ timeout: WAIT });
  await until(page, 'device-reported', /"on"/);
  await until(page, 'link-golioth', /^(?!not linked).+/);
  await until(page, 'link-netneural', /^(?!not linked).+/);

  await tid(page, 'edit-desired').click();
  const editor = tid(page, 'desired-editor');
  await editor.fill('{"led": ');
  await until(page, 'desired-error', /Not valid JSON/);
  check(await tid(page, 'desired-save').isDisabled(), 'save is disabled while the JSON is broken');
  await editor.fill('["led", "on"]');
  await until(page, 'desired-error', /must be a JSON object/);
  await shot(page, 'device-desired-invalid');
  const want = { led: 'on', every: 30 };
  await editor.fill(JSON.stringify(want, null, 2));
  check(!(await tid(page, 'desired-error').isVisible()), 'no error for a valid object');
  // A poll in between must not throw away what is typed.
  await page.waitForTimeout(2300);
  check(JSON.parse(await editor.inputValue()).every === 30, 'the editor kept its text over a poll');
  await tid(page, 'desired-save').click();
  await until(page, 'banner-text', /saved \(version/);
  await until(page, 'device-desired', /"every": 30/);
  await shot(page, 'device');
  await step('desired-saved', { device: DEVICE, desired: want });
  say('the desired document edited in the console reached the device');
}

async function conflictMadeInBothCloudsIsResolvedInTheConsole(page, context) {
  const made = await step('make-conflict');
  await go(page, '#/conflicts', 'conflicts');
  const card = page.locator(`[data-testid="conflict-card"][data-id="${made.id}"]`);
  await card.waitFor({ timeout: WAIT });
  const side = async (id) => JSON.parse((await card.locator(`[data-testid="${id}"] pre`).textContent()) ?? 'null');
  const [local, remote, base] = [await side('conflict-local'), await side('conflict-remote'), await side('conflict-base')];
  check(base === made.base, `base ${JSON.stringify(base)} is ${JSON.stringify(made.base)}`);
  check([local, remote].sort().join() === [...made.sides].sort().join(), `the sides are ${made.sides}: ${local}, ${remote}`);
  check(/\/desired\/led/.test(await card.locator('[data-testid="conflict-field"]').textContent()), 'the field is named');
  await until(page, 'nav-conflict-count', /^1$/);
  await shot(page, 'conflicts');

  // A second operator, in another tab, is typing a value for the same conflict.
  const other = await context.newPage();
  await other.goto(`${BASE}/#/conflicts`);
  await giveToken(other, TOKEN);
  const theirs = other.locator(`[data-testid="conflict-card"][data-id="${made.id}"]`);
  await theirs.waitFor({ timeout: WAIT });
  await theirs.locator('[data-testid="resolve-custom-input"]').fill('green');
  await theirs.locator('[data-testid="resolve-custom"]').click();
  await until(other, 'resolve-custom-error', /Not valid JSON/);
  await theirs.locator('[data-testid="resolve-custom-input"]').fill('"green"');

  // The first resolves with one click.
  await card.locator('[data-testid="resolve-remote"]').click();
  await until(page, 'banner-text', /resolved with/);
  await tid(page, 'conflicts-empty').waitFor({ timeout: WAIT });

  // The second is told plainly; nothing of theirs is applied.
  await theirs.locator('[data-testid="resolve-custom"]').click();
  await until(other, 'banner-text', /already resolved by someone else/);
  await shot(other, 'conflicts-already-resolved');
  await other.close();

  await step('conflict-resolved', { id: made.id, value: remote });
  await tid(page, 'conflicts-all').check();
  await page.locator(`[data-testid="conflict-card"][data-id="${made.id}"][data-status="resolved"]`).waitFor({ timeout: WAIT });
  say(`the conflict was resolved in the console with ${JSON.stringify(remote)}`);
}

async function syncHistoryFilters(page) {
  await go(page, '#/sync', 'sync');
  await tid(page, 'sync-row').first().waitFor({ timeout: WAIT });
  await tid(page, 'sync-filter-outcome').selectOption('completed');
  await tid(page, 'sync-filter-cloud').selectOption('golioth');
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll('[data-testid="sync-row"]')];
    return rows.length > 0 && rows.every((r) => r.dataset.outcome === 'completed' && r.dataset.cloud === 'golioth');
  }, null, { timeout: WAIT });
  await tid(page, 'sync-filter-cloud').selectOption('');
  await tid(page, 'sync-filter-outcome').selectOption('');
  await page.waitForFunction(() => new Set([...document.querySelectorAll('[data-testid="sync-row"]')]
    .map((r) => r.dataset.cloud)).size > 1, null, { timeout: WAIT });
  await shot(page, 'sync');
}

async function configurationAndConnectionTests(page) {
  await go(page, '#/config', 'config');
  await until(page, 'config-toml', /\[golioth\][\s\S]*\[netneural\]/);
  await noSecrets(page, 'the configuration screen');
  await tid(page, 'test-golioth').click();
  await page.locator('[data-testid="test-result-golioth"][data-ok="true"]').waitFor({ timeout: WAIT });
  await until(page, 'test-result-golioth', /^OK · \d+ ms · GET .* · HTTP 200$/);
  await step('netneural-down');
  await tid(page, 'test-netneural').click();
  await page.locator('[data-testid="test-result-netneural"][data-ok="false"]').waitFor({ timeout: WAIT });
  await until(page, 'test-result-netneural', /^Failed · \d+ ms · GET .*503/);
  await shot(page, 'config');
  await step('netneural-up');
}

async function phoneSizedScreens(browser) {
  const context = await browser.newContext({ viewport: { width: 375, height: 740 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
  await context.addInitScript((t) => sessionStorage.setItem('nn-gateway.api-token', t), TOKEN);
  const page = await context.newPage();
  await page.goto(BASE);
  for (const [hash, screen, ready] of [
    ['#/overview', 'overview', 'cloud-golioth'],
    ['#/devices', 'devices', 'device-row'],
    [`#/devices/${encodeURIComponent(DEVICE)}`, 'device', 'device-facts'],
    ['#/conflicts', 'conflicts', 'conflict-card'],
    ['#/sync', 'sync', 'sync-row'],
    ['#/config', 'config', 'test-golioth'],
  ]) {
    await go(page, hash, screen);
    // The conflict is resolved by now: show it anyway, its three sides stacked.
    if (screen === 'conflicts') await tid(page, 'conflicts-all').check();
    await tid(page, ready).first().waitFor({ timeout: WAIT });
    await fitsWidth(page, `${screen} at 375 px`);
    await shot(page, `phone-${screen}`);
  }
  await tid(page, 'forget-token').click();
  await tid(page, 'token-form').waitFor({ state: 'visible', timeout: WAIT });
  await context.close();
}

// ---- run ----
const browser = await chromium.launch({
  executablePath: env('CHROMIUM', '/usr/bin/chromium'),
  headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage'], // root in CI; small /dev/shm
});
const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
const page = await context.newPage();
const problems = [];
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => { if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push(`console error: ${m.text()}`); });
let failed = false;
try {
  const t0 = Date.now();
  for (const [name, run] of [
    ['token', () => tokenIsAskedForAtTheFirst401(page)],
    ['overview', () => overviewShowsACloudGoingOfflineAndBack(page)],
    ['desired', () => desiredEditedInTheConsoleReachesTheDevice(page)],
    ['conflict', () => conflictMadeInBothCloudsIsResolvedInTheConsole(page, context)],
    ['sync history', () => syncHistoryFilters(page)],
    ['configuration', () => configurationAndConnectionTests(page)],
    ['phone', () => phoneSizedScreens(browser)],
  ]) {
    const t = Date.now();
    await run();
    say(`${name}: passed in ${Date.now() - t} ms`);
  }
  check(problems.length === 0, `the page logged errors:\n${problems.join('\n')}`);
  say(`all scenarios passed in ${Date.now() - t0} ms`);
} catch (e) {
  failed = true;
  console.error(`FAIL: ${e.stack ?? e}`);
  if (problems.length) console.error(problems.join('\n'));
  await page.screenshot({ path: join(SHOTS, 'failure.png'), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
