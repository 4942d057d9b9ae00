/**
 * The ship benchmark's peer: the plainest TCP copy Deno can do, run as two processes like ship
 * and receive. No framing, no checksums, no fsync: what the loopback and the runtime allow.
 *
 * - `deno run -A bench/_tcp_pipe.ts server <host:port>` listens (port 0 picks one), prints
 *   `listening on HOST:PORT` on stderr, then for each connection reads into one reused buffer and
 *   discards, and prints `received BYTES` on stderr when the peer closes.
 * - `deno run -A bench/_tcp_pipe.ts client <host:port> FILE...` streams the files in order through
 *   one connection, a 1 MiB read then a write at a time, waits for the server to close its end,
 *   and prints `{"bytes":…,"durationMs":…}` on stdout.
 *
 * @module
 */

/** Bytes per read of a file and per socket read. */
const BUFFER_BYTES = 1024 * 1024;

async function serve(address: string): Promise<void> {
  const [hostname, port] = splitAddress(address);
  const listener = Deno.listen({ hostname, port });
  const addr = listener.addr as Deno.NetAddr;
  console.error(`listening on ${addr.hostname}:${addr.port}`);
  const buffer = new Uint8Array(BUFFER_BYTES);
  for await (const conn of listener) {
    let bytes = 0;
    for (;;) {
      const count = await conn.read(buffer);
      if (count === null) break;
      bytes += count;
    }
    // Closing tells the client every byte was read (its read returns null).
    conn.close();
    console.error(`received ${bytes}`);
  }
}

async function send(address: string, files: string[]): Promise<void> {
  const startedMs = performance.now();
  const [hostname, port] = splitAddress(address);
  const conn = await Deno.connect({ hostname, port });
  const buffer = new Uint8Array(BUFFER_BYTES);
  let bytes = 0;
  for (const path of files) {
    const file = await Deno.open(path, { read: true });
    try {
      for (;;) {
        const count = await file.read(buffer);
        if (count === null) break;
        let written = 0;
        while (written < count) written += await conn.write(buffer.subarray(written, count));
        bytes += count;
      }
    } finally {
      file.close();
    }
  }
  await conn.closeWrite();
  // Wait for the server to have read everything: it closes only after its last read.
  while ((await conn.read(buffer)) !== null) { /* the server sends nothing */ }
  conn.close();
  console.log(JSON.stringify({ bytes, durationMs: Math.round(performance.now() - startedMs) }));
}

function splitAddress(address: string): [string, number] {
  const colon = address.lastIndexOf(":");
  return [address.slice(0, colon), Number(address.slice(colon + 1))];
}

if (import.meta.main) {
  const [mode, address, ...files] = Deno.args;
  if (mode === "server" && address !== undefined) await serve(address);
  else if (mode === "client" && address !== undefined) await send(address, files);
  else {
    console.error("usage: _tcp_pipe.ts server HOST:PORT | client HOST:PORT FILE...");
    Deno.exit(2);
  }
}
