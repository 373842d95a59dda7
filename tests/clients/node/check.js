// Drives mproxy with the 'memcached' npm client (ASCII protocol) and prints one
// JSON object of results; tests/test_clients.py compares them with what
// memcached would answer. Usage: node check.js HOST:PORT
'use strict';
const Memcached = require('memcached');

const server = process.argv[2];
const mc = new Memcached(server, { retries: 0, timeout: 5000, idle: 1000, poolSize: 4 });

function call(method, ...args) {
  return new Promise((resolve) => {
    mc[method](...args, (err, data) => resolve(err ? { error: String(err.message || err) } : data));
  });
}

async function main() {
  const results = {};
  await call('flush');
  results.set = await call('set', 'node:a', 'alpha', 100);
  results.get = await call('get', 'node:a');
  results.add_existing = await call('add', 'node:a', 'x', 100);
  results.replace = await call('replace', 'node:a', 'beta', 100);
  results.append = await call('append', 'node:a', '+');
  results.prepend = await call('prepend', 'node:a', '-');
  results.after_concat = await call('get', 'node:a');
  results.json = await call('set', 'node:j', { n: 1, list: [1, 2] }, 100);
  results.json_back = await call('get', 'node:j');
  await call('set', 'node:n', 10, 100);
  results.incr = await call('incr', 'node:n', 5);
  results.decr = await call('decr', 'node:n', 100);
  results.incr_missing = await call('incr', 'node:missing', 1);
  const gets = await call('gets', 'node:a');
  results.gets_has_cas = gets && typeof gets.cas === 'string' && gets.cas.length > 0;
  results.cas = await call('cas', 'node:a', 'gamma', gets.cas, 100);
  results.cas_stale = await call('cas', 'node:a', 'delta', gets.cas, 100);
  results.touch = await call('touch', 'node:a', 100);
  const keys = [];
  for (let i = 0; i < 200; i++) {
    keys.push(`node:m${i}`);
    await call('set', `node:m${i}`, `v${i}`, 100);
  }
  const multi = await call('getMulti', keys.concat(['node:absent']));
  results.multi_count = Object.keys(multi).length;
  results.multi_sample = multi['node:m123'];
  results.del = await call('del', 'node:a');
  results.get_deleted_is_miss = (await call('get', 'node:a')) === undefined;
  const version = await call('version');
  results.version_ok = Array.isArray(version) && version.length === 1 && typeof version[0].version === 'string';
  mc.end();
  process.stdout.write(JSON.stringify(results) + '\n');
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack || err) + '\n');
  process.exit(1);
});
