// Cube's own client, pointed at a project's query_url on the gateway with an instance's token:
// prints the cubes from `meta` and TrackedEvents.count from `load` as JSON on one line.
// The client polls by itself while the answer is "Continue wait".
//
//   node check.js <query_url> <token> <instance-id>

const cubejs = require('@cubejs-client/core').default;

async function main() {
  const [apiUrl, token, instance] = process.argv.slice(2);
  if (!instance) {
    throw new Error('usage: node check.js <query_url> <token> <instance-id>');
  }
  const api = cubejs(`Bearer ${token}`, {
    apiUrl,
    headers: { 'X-Gitlab-Instance-Id': instance },
  });
  const meta = await api.meta();
  const result = await api.load({ measures: ['TrackedEvents.count'] });
  const [row] = result.tablePivot();
  console.log(JSON.stringify({
    cubes: meta.cubes.map((cube) => cube.name),
    count: Number(row['TrackedEvents.count']),
  }));
}

main().catch((error) => {
  console.error(error && error.message ? error.message : String(error));
  process.exit(1);
});
