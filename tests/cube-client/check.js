// Cube's own client, pointed at a project's query_url on the gateway with an instance's token:
// prints the cubes from `meta`, the measure (default TrackedEvents.count) from `load`, and how
// many times Cube answered "Continue wait" before the result, as JSON on one line. The client
// polls by itself while the answer is "Continue wait".
//
//   node check.js <query_url> <token> <instance-id> [measure]

const cubejs = require('@cubejs-client/core').default;

async function main() {
  const [apiUrl, token, instance, measure = 'TrackedEvents.count'] = process.argv.slice(2);
  if (!instance) {
    throw new Error('usage: node check.js <query_url> <token> <instance-id> [measure]');
  }
  const api = cubejs(`Bearer ${token}`, {
    apiUrl,
    headers: { 'X-Gitlab-Instance-Id': instance },
  });
  const meta = await api.meta();
  // The client calls progressCallback for every "Continue wait" before it asks again.
  let continueWaits = 0;
  const result = await api.load(
    { measures: [measure] },
    { progressCallback: () => { continueWaits += 1; } },
  );
  const [row] = result.tablePivot();
  console.log(JSON.stringify({
    cubes: meta.cubes.map((cube) => cube.name),
    count: Number(row[measure]),
    continue_waits: continueWaits,
  }));
}

main().catch((error) => {
  console.error(error && error.message ? error.message : String(error));
  process.exit(1);
});
