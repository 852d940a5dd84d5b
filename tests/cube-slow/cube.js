// Cube for the tests of its "Continue wait" phase: the shipped configuration, except that Cube
// answers "Continue wait" once a query has run for 1 s (instead of 5 s), with model/ holding a
// cube whose every query takes several seconds in ClickHouse. Started by scripts/stack.sh
// cube-serve.

const shipped = require('../../config/cube/cube.js');

module.exports = {
  ...shipped,
  orchestratorOptions: { continueWaitTimeout: 1 },
};
