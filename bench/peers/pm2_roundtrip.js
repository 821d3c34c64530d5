// Time status round trips (pm2.list) to a running pm2 daemon from one client.
// Usage: node pm2_roundtrip.js PM2_MODULE_DIR COUNT. Prints a JSON list of
// durations in seconds. PM2_HOME in the environment selects the daemon.
"use strict";
const pm2 = require(process.argv[2]);
const count = Number(process.argv[3]);

function list() {
  return new Promise((resolve, reject) => {
    pm2.list((err, apps) => (err ? reject(err) : resolve(apps)));
  });
}

pm2.connect(async (err) => {
  if (err) {
    console.error(`Could not connect to the pm2 daemon: ${err.message}`);
    process.exit(1);
  }
  await list(); // warm up outside the timed loop
  const durations = [];
  for (let i = 0; i < count; i++) {
    const start = process.hrtime.bigint();
    await list();
    durations.push(Number(process.hrtime.bigint() - start) / 1e9);
  }
  process.stdout.write(JSON.stringify(durations));
  pm2.disconnect();
});
