/**
 * Malformed NBD traffic against the real `sectorlog watch` (DESIGN.md invariant 8): each bad
 * request gets an error reply or its connection closed, never the server; another connection and
 * qemu-io keep working meanwhile; nothing is journaled for the bad requests; `verify` stays clean.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { encodeRequest as request, RawNbdClient } from "./_nbd_client.ts";
import {
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
} from "../lib/nbd/constants.ts";
import {
  assertFilesEqual,
  entryCount,
  makeSparseImage,
  qemuIo,
  runCli,
  runCliOk,
  skipReason,
  snapshot,
  WatchProcess,
  withTempDir,
} from "./_watch_harness.ts";

const MiB = 1024 * 1024;
const DEVICE_BYTES = 8 * MiB;

/** A raw client that has finished the handshake (fixed newstyle, NBD_OPT_GO). */
async function openClient(socketPath: string): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(socketPath);
  try {
    await client.startHandshake();
    const { sizeBytes } = await client.go("");
    assert.equal(sizeBytes, BigInt(DEVICE_BYTES));
    return client;
  } catch (error) {
    client.close();
    throw error;
  }
}

/** Reads `length` bytes at `offset` on a working connection and checks they are all `value`. */
async function assertReads(
  client: RawNbdClient,
  handle: bigint,
  offset: number,
  length: number,
  value: number,
): Promise<void> {
  await client.sendRead(handle, offset, length);
  const reply = await client.mustReadReply();
  assert.equal(reply.handle, handle);
  assert.equal(reply.error, 0, `read at ${offset} failed with ${reply.error}`);
  assert.ok(reply.data.every((b) => b === value), `read at ${offset}: expected 0x${value}`);
}

/** The outcome of a bad request: an error reply (its errno), or "closed". */
async function outcome(client: RawNbdClient, handle: bigint): Promise<number | "closed"> {
  const reply = await client.readReply();
  if (reply === null) return "closed";
  assert.equal(reply.handle, handle, "an error reply must echo the request's handle");
  assert.notEqual(reply.error, 0, `bad request with handle ${handle} succeeded`);
  return reply.error;
}

/** One malformed exchange on a fresh connection. */
interface BadCase {
  name: string;
  /** Sends the bad bytes; returns what the server did. */
  send(client: RawNbdClient): Promise<number | "closed" | "client closed">;
  /** The acceptable outcomes. */
  expect: (number | "closed" | "client closed")[];
  /** The connection must still serve a good request afterwards. */
  survives?: boolean;
}

const BAD_CASES: BadCase[] = [
  {
    name: "garbage bytes instead of a request",
    send: async (c) => {
      await c.send(new TextEncoder().encode("GET / HTTP/1.1\r\nHost: example\r\n\r\n".repeat(4)));
      return await outcome(c, 0n);
    },
    expect: ["closed"],
  },
  {
    name: "a truncated request header, then close",
    send: async (c) => {
      await c.send(request({ type: NBD_CMD_WRITE, handle: 1n, length: 4096 }).subarray(0, 13));
      c.close();
      return "client closed";
    },
    expect: ["client closed"],
  },
  {
    name: "a WRITE whose payload is cut short, then close",
    send: async (c) => {
      const payload = new Uint8Array(64 * 1024).fill(0xbd);
      await c.send(
        request({ type: NBD_CMD_WRITE, handle: 2n, offset: 0, payload }).subarray(0, 28 + 1000),
      );
      c.close();
      return "client closed";
    },
    expect: ["client closed"],
  },
  {
    name: "a wrong request magic",
    send: async (c) => {
      await c.send(request({ type: NBD_CMD_READ, handle: 3n, length: 512, magic: 0x25609514 }));
      return await outcome(c, 3n);
    },
    expect: ["closed"],
  },
  {
    name: "a WRITE with a 4 GiB length",
    send: async (c) => {
      await c.send(request({ type: NBD_CMD_WRITE, handle: 4n, offset: 0, length: 0xffffffff }));
      await c.send(new Uint8Array(256 * 1024).fill(0xbd));
      return await outcome(c, 4n);
    },
    expect: [NBD_EINVAL, "closed"],
  },
  {
    name: "a READ past the end",
    send: async (c) => {
      await c.send(request({ type: NBD_CMD_READ, handle: 5n, offset: DEVICE_BYTES, length: 4096 }));
      return await outcome(c, 5n);
    },
    expect: [NBD_EINVAL],
    survives: true,
  },
  {
    name: "a READ straddling the end",
    send: async (c) => {
      const offset = DEVICE_BYTES - 512;
      await c.send(request({ type: NBD_CMD_READ, handle: 6n, offset, length: 4096 }));
      return await outcome(c, 6n);
    },
    expect: [NBD_EINVAL],
    survives: true,
  },
  {
    name: "a WRITE straddling the end (its payload is skipped)",
    send: async (c) => {
      const payload = new Uint8Array(4096).fill(0xbd);
      const offset = DEVICE_BYTES - 2048;
      await c.send(request({ type: NBD_CMD_WRITE, handle: 7n, offset, payload }));
      return await outcome(c, 7n);
    },
    expect: [NBD_ENOSPC],
    survives: true,
  },
  {
    name: "a WRITE at an offset near 2^64",
    send: async (c) => {
      const payload = new Uint8Array(512).fill(0xbd);
      await c.send(
        request({ type: NBD_CMD_WRITE, handle: 8n, offset: 0xfffffffffffffe00n, payload }),
      );
      return await outcome(c, 8n);
    },
    expect: [NBD_ENOSPC, NBD_EINVAL],
    survives: true,
  },
  {
    name: "TRIM and WRITE_ZEROES past the end",
    send: async (c) => {
      await c.send(request({ type: NBD_CMD_TRIM, handle: 9n, offset: 4096, length: 0xffffffff }));
      const first = await outcome(c, 9n);
      await c.send(
        request({ type: NBD_CMD_WRITE_ZEROES, handle: 10n, offset: DEVICE_BYTES, length: 512 }),
      );
      const second = await outcome(c, 10n);
      return first === second ? first : "closed";
    },
    expect: [NBD_EINVAL],
    survives: true,
  },
  {
    name: "an unknown command and unknown flags",
    send: async (c) => {
      await c.send(request({ type: 42, handle: 11n, offset: 0, length: 512 }));
      const first = await outcome(c, 11n);
      const payload = new Uint8Array(512).fill(0xbd);
      await c.send(request({ type: NBD_CMD_WRITE, handle: 12n, flags: 0x8000, payload }));
      const second = await outcome(c, 12n);
      return first === second ? first : "closed";
    },
    expect: [NBD_EINVAL],
    survives: true,
  },
  {
    name: "a READ longer than the 32 MiB payload limit",
    send: async (c) => {
      await c.send(request({ type: NBD_CMD_READ, handle: 13n, offset: 0, length: 64 * MiB }));
      return await outcome(c, 13n);
    },
    expect: [NBD_EINVAL, "closed"],
  },
];

const BAD = "malformed NBD requests to watch are refused and journal nothing; others keep working";
Deno.test({
  name: BAD,
  ignore: skipReason(BAD, ["qemu-io"]) !== undefined,
  fn: () =>
    withTempDir(async (dir) => {
      const device = join(dir, "disk.img");
      const logdir = join(dir, "log");
      const socketPath = join(dir, "nbd.sock");
      await makeSparseImage(device, DEVICE_BYTES);
      await snapshot(device, logdir);
      const watch = await WatchProcess.start(device, logdir, { socketPath });
      let good: RawNbdClient | undefined;
      try {
        await qemuIo(watch.uri, ["write -P 0x11 0 64k", "write -P 0x12 8188k 4k", "flush"]);
        good = await openClient(socketPath);
        await assertReads(good, 100n, 0, 4096, 0x11);
        const entriesBefore = await entryCount(logdir);

        let handle = 1000n;
        for (const bad of BAD_CASES) {
          const client = await openClient(socketPath);
          try {
            const result = await bad.send(client);
            assert.ok(
              bad.expect.includes(result),
              `${bad.name}: got ${result}, expected one of ${bad.expect.join(", ")}`,
            );
            if (bad.survives === true) await assertReads(client, 99n, 0, 512, 0x11);
          } finally {
            client.close();
          }
          // The other connection is unaffected.
          await assertReads(good, handle++, 0, 4096, 0x11);
          await assertReads(good, handle++, DEVICE_BYTES - 4096, 4096, 0x12);
        }
        // A garbage handshake only loses its own connection too.
        const rude = await RawNbdClient.connect(socketPath);
        try {
          await rude.readGreeting();
          await rude.send(new Uint8Array(64).fill(0xff));
          assert.ok(await rude.isClosedByServer(), "garbage client flags must close");
        } finally {
          rude.close();
        }

        assert.equal(await entryCount(logdir), entriesBefore, "bad requests must log nothing");

        await qemuIo(watch.uri, ["write -P 0x21 1M 64k", "read -P 0x21 1M 64k", "flush"]);
        await qemuIo(watch.uri, ["read -P 0x11 0 64k", "read -P 0 64k 960k"], { readOnly: true });
        await good.sendRequest({
          type: NBD_CMD_WRITE,
          handle: 1n,
          offset: 2 * MiB,
          payload: new Uint8Array(4096).fill(0x31),
        });
        assert.equal((await good.mustReadReply()).error, 0);
        await good.sendRequest({ type: NBD_CMD_FLUSH, handle: 2n });
        assert.equal((await good.mustReadReply()).error, 0);
        await assertReads(good, 3n, 2 * MiB, 4096, 0x31);
        good.close();
        await watch.stop();
      } finally {
        good?.close();
        await watch.close();
      }
      assert.doesNotMatch(watch.stderr, /internal error/);

      const verify = await runCli(["verify", logdir, "--json"]);
      assert.equal(verify.code, 0, verify.stdout + verify.stderr);
      assert.equal(JSON.parse(verify.stdout).ok, true);
      const restored = join(dir, "restored.img");
      await runCliOk(["restore", logdir, restored]);
      assertFilesEqual(restored, device, "restore (latest) vs device");
      const bytes = await Deno.readFile(device);
      // The bad writes' 0xbd pattern reached neither the device nor the journal.
      assert.equal(bytes.indexOf(0xbd), -1, "a refused write changed the device");
      assert.ok(bytes.subarray(0, 64 * 1024).every((b) => b === 0x11));
      assert.ok(bytes.subarray(DEVICE_BYTES - 4096).every((b) => b === 0x12));
    }),
});
