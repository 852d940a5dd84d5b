// Preloaded by scripts/stack.sh (`node --require ./listen-host.js ...`) so that the local Cube
// binds only CUBE_LISTEN_HOST (127.0.0.1). Cube 0.33 calls `server.listen(PORT)` without a host,
// which binds every interface, and has no setting for it. Production deployments do not load
// this file; without CUBE_LISTEN_HOST it changes nothing.

const net = require('net');

const host = process.env.CUBE_LISTEN_HOST;

if (host) {
  const listen = net.Server.prototype.listen;

  net.Server.prototype.listen = function listenOnHost(...args) {
    const [first, second] = args;

    // listen(port[, backlog][, callback]) -> listen(port, host[, backlog][, callback])
    const isPort = typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first));
    if (isPort && typeof second !== 'string') {
      return listen.call(this, first, host, ...args.slice(1));
    }

    // listen({ port }[, callback]) -> listen({ port, host }[, callback])
    if (first && typeof first === 'object' && first.port !== undefined
      && first.host === undefined && first.path === undefined) {
      return listen.call(this, { ...first, host }, ...args.slice(1));
    }

    return listen.apply(this, args);
  };
}
