// Drives mproxy with the 'memjs' npm client (binary protocol only) and prints one
// JSON object of results; tests/test_clients.py compares them with what memcached
// answers. Usage: node check_memjs.js HOST:PORT
'use strict';
const memjs = require('memjs');

const server = process.argv[2];
const quiet = { log: () => {} };
const mc = memjs.Client.create(server, { retries: 0, timeout: 5, conntimeout: 5, logger: quiet });

// every call as a promise of a plain result: errors become {error: message}
function call(method, ...args) {
  return new Promise((resolve) => {
    mc[method](...args, (err, ...results) => {
      if (err) {
        resolve({ error: String(err.message || err) });
        return;
      }
      resolve(results.map((r) => (Buffer.isBuffer(r) ? r.toString('latin1') : r)));
    });
  });
}

async function main() {
  const results = {};
  results.flush = await new Promise((resolve) => mc.flush((err, res) => resolve(err ? String(err) : Object.values(res))));
  results.set = await call('set', 'memjs:a', 'alpha', { expires: 100 });
  results.get = await call('get', 'memjs:a');
  results.get_missing = await call('get', 'memjs:missing');
  results.add_existing = await call('add', 'memjs:a', 'x', { expires: 100 });
  results.add_new = await call('add', 'memjs:b', 'bravo', { expires: 100 });
  results.replace = await call('replace', 'memjs:a', 'beta', { expires: 100 });
  results.replace_missing = await call('replace', 'memjs:nope', 'x', { expires: 100 });
  results.append = await call('append', 'memjs:a', '+');
  results.prepend = await call('prepend', 'memjs:a', '-');
  results.append_missing = await call('append', 'memjs:nope', '+');
  results.after_concat = await call('get', 'memjs:a');
  results.binary_value = await call('set', 'memjs:bin', Buffer.from([0, 128, 255, 13, 10]), {});
  results.binary_back = await call('get', 'memjs:bin');
  // memjs sends an initial value (0) and expiry with every increment: a missing
  // counter is created, as memcached's binary protocol does
  results.incr_create = await call('increment', 'memjs:n', 5, { initial: 10 });
  results.incr = await call('increment', 'memjs:n', 5, {});
  results.decr = await call('decrement', 'memjs:n', 100, {});
  results.decr_create = await call('decrement', 'memjs:m', 1, { initial: 7, expires: 100 });
  await call('set', 'memjs:text', 'abc', {});
  results.incr_text = await call('increment', 'memjs:text', 1, {});
  results.touch = await call('touch', 'memjs:a', 100);
  results.touch_missing = await call('touch', 'memjs:nope', 100);
  results.del = await call('delete', 'memjs:a');
  results.del_again = await call('delete', 'memjs:a');
  results.get_deleted = await call('get', 'memjs:a');
  // memjs has no multi-get: concurrent gets on one connection, answered in order
  const keys = [];
  for (let i = 0; i < 200; i++) keys.push(`memjs:m${i}`);
  await Promise.all(keys.map((k, i) => call('set', k, `v${i}`, {})));
  const many = await Promise.all(keys.concat(['memjs:absent']).map((k) => call('get', k)));
  results.multi_count = many.filter((r) => Array.isArray(r) && r[0] !== null).length;
  results.multi_sample = many[123];
  const stats = await new Promise((resolve) => mc.stats((err, srv, st) => resolve(err ? { error: String(err) } : st)));
  results.stats_ok = stats !== null && typeof stats.cmd_get === 'string' && typeof stats.curr_connections === 'string';
  results.flush_then_get = await new Promise((resolve) => mc.flush(() => resolve(null))).then(() => call('get', 'memjs:b'));
  mc.quit();
  process.stdout.write(JSON.stringify(results) + '\n');
}

main().catch((err) => {
  process.stderr.write(String((err && err.stack) || err) + '\n');
  process.exit(1);
});
