import assert from "node:assert/strict";
import { join } from "node:path";
import { compactLogdir } from "../lib/compact.ts";
import { readManifest } from "../lib/format/logdir.ts";
import { listEntries, readTimeline } from "../lib/timeline.ts";
import { clientProof, loadKeyFile, makeNonce, type ShipKey, toHex } from "../lib/ship/auth.ts";
import { PROTOCOL_NAME } from "../lib/ship/_messages.ts";
import { Receiver, type ReceiverEvent } from "../lib/ship/receiver.ts";
import { type ShipEvent, shipLogdir } from "../lib/ship/sender.ts";
import {
  decodeErrorBody,
  decodeJsonBody,
  encodeJsonFrame,
  type ErrorBody,
  FRAME_TYPES,
  FrameReader,
  PROTOCOL_VERSION,
  writeAll,
} from "../lib/ship/wire.ts";
import { ENTRY_FORMAT_VERSION } from "../lib/format/entry.ts";
import { MANIFEST_FORMAT_VERSION } from "../lib/format/manifest.ts";
import { FakeClock, type Random, withSeed, withTempDir } from "./_helpers.ts";
import { run, runCli, skipReason } from "./_watch_harness.ts";
import {
  assertSameRestores,
  CliProcess,
  copyLastSeq,
  lastSeqOf,
  listNames,
  makeSource,
  restorePoints,
  startReceive,
  waitUntil,
  writeEntries,
} from "./_ship_harness.ts";

function startReceiver(
  storedir: string,
  events: ReceiverEvent[],
  options: Partial<Parameters<typeof Receiver.start>[0]> = {},
): Promise<Receiver> {
  return Receiver.start({
    storedir,
    port: 0,
    segmentBytesMax: 64 * 1024,
    onEvent: (event) => events.push(event),
    ...options,
  });
}

function target(receiver: Receiver) {
  return { hostname: "127.0.0.1", port: receiver.addr.port };
}

function messages(events: ReceiverEvent[]): string {
  return events.map((e) => `${e.level}: ${e.message}`).join("\n");
}

async function writeKey(path: string, random: Random): Promise<void> {
  const bytes = new Uint8Array(32);
  random.fill(bytes);
  await Deno.writeTextFile(path, toHex(bytes) + "\n");
}

Deno.test("shipLogdir() copies a logdir exactly, then ships only what is new", async () => {
  await withTempDir((dir) =>
    withSeed(async (random) => {
      const clock = new FakeClock();
      const source = await makeSource(dir, "vm1", random, clock);
      await writeEntries(source, random, 150, clock);
      const storedir = join(dir, "store");
      const events: ReceiverEvent[] = [];
      const receiver = await startReceiver(storedir, events);
      try {
        const first = await shipLogdir(source.logdir, target(receiver));
        assert.equal(first.statesSent, 1);
        assert.equal(first.lastSeq, await lastSeqOf(source.logdir));
        assert.ok(first.baseBytesSent < 300_000, `base travels sparse and compressed`);
        const copy = join(storedir, "vm1");
        await assertSameRestores(source.logdir, copy, dir, await restorePoints(source.logdir));

        await writeEntries(source, random, 60, clock);
        const second = await shipLogdir(source.logdir, target(receiver));
        assert.equal(second.statesSent, 0, "an incremental ship sends no base");
        assert.equal(second.entriesSent, (await lastSeqOf(source.logdir)) - first.lastSeq);
        await assertSameRestores(source.logdir, copy, dir, await restorePoints(source.logdir));

        const third = await shipLogdir(source.logdir, target(receiver));
        assert.equal(third.entriesSent, 0);
        assert.equal(third.lastSeq, second.lastSeq);
        const copyManifest = await readManifest(copy);
        const sourceManifest = await readManifest(source.logdir);
        assert.equal(copyManifest.logdirId, sourceManifest.logdirId);
        assert.deepEqual(copyManifest.base, sourceManifest.base);
      } finally {
        await receiver.close();
      }
      assert.deepEqual(listNames(storedir), ["vm1"], messages(events));
    })
  );
});

Deno.test("shipLogdir() sends the compacted state when the source was compacted past the copy", async () => {
  await withTempDir((dir) =>
    withSeed(async (random) => {
      const clock = new FakeClock();
      const source = await makeSource(dir, "vm2", random, clock);
      await writeEntries(source, random, 80, clock);
      const storedir = join(dir, "store");
      const events: ReceiverEvent[] = [];
      const receiver = await startReceiver(storedir, events);
      try {
        const first = await shipLogdir(source.logdir, target(receiver));
        await writeEntries(source, random, 120, clock);
        const timeline = await readTimeline(source.logdir);
        // Cut well after the copy's last entry: the entries right after it are folded away.
        const cutSeq = first.lastSeq + 60;
        let cutUs = 0;
        for await (const entry of listEntries(source.logdir, timeline.manifest)) {
          if (entry.seq === cutSeq) cutUs = entry.timeUs;
        }
        await compactLogdir(source.logdir, { cutUs, nowUs: clock.nowUs + 1 });
        const compacted = await readManifest(source.logdir);
        assert.ok(compacted.levels.length > 0, "the source has a level");
        const shipEvents: ShipEvent[] = [];
        const second = await shipLogdir(source.logdir, target(receiver), {
          onEvent: (event) => shipEvents.push(event),
        });
        const connected = shipEvents.find((e) => e.kind === "connected");
        assert.ok(connected?.kind === "connected");
        assert.equal(connected.plan.action, "state");
        assert.equal(connected.plan.reason, "compacted");
        assert.equal(connected.plan.baseIncluded, false, "the receiver links the base it has");
        assert.deepEqual(second.horizonMoves, [{
          fromUs: (await readManifest(source.logdir)).base.endedUs,
          toUs: compacted.horizonUs,
        }]);
        const copy = join(storedir, "vm2");
        assert.equal((await readManifest(copy)).horizonUs, compacted.horizonUs);
        assert.match(messages(events), /installed a compacted state.*horizon moved from/);
        await assertSameRestores(source.logdir, copy, dir, await restorePoints(source.logdir));
      } finally {
        await receiver.close();
      }
    })
  );
});

Deno.test("ship and receive with --key-file: the right key works, a wrong one is refused on both sides", async () => {
  await withTempDir((dir) =>
    withSeed(async (random) => {
      const source = await makeSource(dir, "vm3", random);
      await writeEntries(source, random, 30);
      await writeKey(join(dir, "ship.key"), random);
      await writeKey(join(dir, "wrong.key"), random);
      const events: ReceiverEvent[] = [];
      const storedir = join(dir, "store");
      const receiver = await startReceiver(storedir, events, {
        key: await loadKeyFile(join(dir, "ship.key")),
      });
      const address = `127.0.0.1:${receiver.addr.port}`;
      try {
        const wrong = await runCli([
          "ship",
          source.logdir,
          address,
          "--key-file",
          join(dir, "wrong.key"),
        ]);
        assert.equal(wrong.code, 2, wrong.stderr);
        assert.match(
          wrong.stderr,
          /Authentication failed for host "vm3": its key proof does not match/,
        );
        assert.match(
          messages(events),
          /warn: Refused 127\.0\.0\.1:\d+: Authentication failed for host "vm3"/,
        );
        assert.deepEqual(listNames(storedir), [], "a refused host creates nothing");

        const none = await runCli(["ship", source.logdir, address]);
        assert.equal(none.code, 2, none.stderr);
        assert.match(none.stderr, /the receiver requires a key/);

        const right = await runCli([
          "ship",
          source.logdir,
          address,
          "--key-file",
          join(dir, "ship.key"),
        ]);
        assert.equal(right.code, 0, right.stderr);
        assert.match(right.stderr, /holds host vm3 up to seq \d+/);
      } finally {
        await receiver.close();
      }
      const keyless = await startReceiver(join(dir, "store2"), events);
      try {
        const result = await runCli([
          "ship",
          source.logdir,
          `127.0.0.1:${keyless.addr.port}`,
          "--key-file",
          join(dir, "ship.key"),
        ]);
        assert.equal(result.code, 2, result.stderr);
        assert.match(result.stderr, /the receiver does not check keys/);
      } finally {
        await keyless.close();
      }
      await assertSameRestores(source.logdir, join(storedir, "vm3"), dir, [undefined]);
    })
  );
});

Deno.test({
  name: "ship --tls-ca: without the receiver's CA it fails clearly, with it it works",
  ignore: skipReason("ship --tls-ca", ["openssl"]) !== undefined,
  fn: async () => {
    await withTempDir((dir) =>
      withSeed(async (random) => {
        await makeCertificates(dir);
        const source = await makeSource(dir, "vm4", random);
        await writeEntries(source, random, 20);
        const storedir = join(dir, "store");
        const { process: receive, port } = await startReceive(storedir, [
          "--tls-cert",
          join(dir, "server.pem"),
          "--tls-key",
          join(dir, "server.key"),
        ]);
        try {
          assert.match(receive.stderr, /listening on .*\(TLS, no key\)/);
          const untrusted = await runCli(["ship", source.logdir, `127.0.0.1:${port}`, "--tls"]);
          assert.equal(untrusted.code, 2, untrusted.stderr);
          assert.match(untrusted.stderr, /TLS certificate not trusted/);
          assert.match(untrusted.stderr, /hint: pass --tls-ca/);
          const trusted = await runCli([
            "ship",
            source.logdir,
            `127.0.0.1:${port}`,
            "--tls-ca",
            join(dir, "ca.pem"),
          ]);
          assert.equal(trusted.code, 0, trusted.stderr);
          assert.equal((await receive.stop()).code, 0, receive.stderr);
        } finally {
          await receive.close();
        }
        await assertSameRestores(source.logdir, join(storedir, "vm4"), dir, [undefined]);
      })
    );
  },
});

/** A CA, and a server certificate for 127.0.0.1 signed by it. */
async function makeCertificates(dir: string): Promise<void> {
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  const steps = [
    [
      "req",
      "-x509",
      ...ec,
      "-keyout",
      "ca.key",
      "-out",
      "ca.pem",
      "-days",
      "2",
      "-subj",
      "/CN=sectorlog test CA",
      "-addext",
      "basicConstraints=critical,CA:TRUE",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
    ],
    ["req", ...ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
    [
      "x509",
      "-req",
      "-in",
      "server.csr",
      "-CA",
      "ca.pem",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-out",
      "server.pem",
      "-days",
      "2",
      "-extfile",
      "server.ext",
    ],
  ];
  await Deno.writeTextFile(
    join(dir, "server.ext"),
    "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
  );
  for (const args of steps) {
    const result = await run("openssl", args, { cwd: dir });
    assert.equal(result.code, 0, `openssl ${args.join(" ")}: ${result.stderr}`);
  }
}

Deno.test("a second ship of the same host while one runs exits 4", async () => {
  await withTempDir((dir) =>
    withSeed(async (random) => {
      const source = await makeSource(dir, "vm5", random);
      await writeEntries(source, random, 20);
      const events: ReceiverEvent[] = [];
      const receiver = await startReceiver(join(dir, "store"), events);
      const address = `127.0.0.1:${receiver.addr.port}`;
      const follow = new CliProcess(["ship", source.logdir, address, "--follow"]);
      try {
        await follow.waitFor(/lag 0 entries|connected to/);
        await waitUntil(() => receiver.activeHosts.includes("vm5"), "the follow session");
        const second = await runCli(["ship", source.logdir, address]);
        assert.equal(second.code, 4, second.stderr);
        assert.match(second.stderr, /Host vm5 is already shipping to this receiver/);
        const status = await follow.stop("SIGTERM");
        assert.equal(status.code, 0, follow.stderr);
        assert.match(follow.stderr, /holds host vm5 up to seq \d+/);
      } finally {
        await follow.close();
        await receiver.close();
      }
    })
  );
});

Deno.test("shipping another logdir under an existing host id is refused unless --force", async () => {
  await withTempDir((dir) =>
    withSeed(async (random) => {
      const first = await makeSource(dir, "first", random);
      await writeEntries(first, random, 30);
      const second = await makeSource(dir, "second", random);
      await writeEntries(second, random, 40);
      const storedir = join(dir, "store");
      const events: ReceiverEvent[] = [];
      const receiver = await startReceiver(storedir, events);
      const address = `127.0.0.1:${receiver.addr.port}`;
      try {
        const ok = await runCli(["ship", first.logdir, address, "--host-id", "shared"]);
        assert.equal(ok.code, 0, ok.stderr);
        const refused = await runCli(["ship", second.logdir, address, "--host-id", "shared"]);
        assert.equal(refused.code, 2, refused.stderr);
        assert.match(
          refused.stderr,
          /Host shared on this receiver holds logdir [-0-9a-f]+, not [-0-9a-f]+: refusing to mix/,
        );
        assert.match(refused.stderr, /hint: .*--force/);
        await assertSameRestores(first.logdir, join(storedir, "shared"), dir, [undefined]);

        const forced = await runCli([
          "ship",
          second.logdir,
          address,
          "--host-id",
          "shared",
          "--force",
          "--json",
        ]);
        assert.equal(forced.code, 0, forced.stderr);
        assert.equal(JSON.parse(forced.stdout).statesSent, 1);
        assert.match(messages(events), /a replacement of its copy/);
      } finally {
        await receiver.close();
      }
      await assertSameRestores(
        second.logdir,
        join(storedir, "shared"),
        dir,
        await restorePoints(second.logdir),
      );
      assert.deepEqual(listNames(storedir), ["shared"]);
    })
  );
});

/** A raw client: connect and read SERVER_HELLO. */
async function rawConnect(port: number) {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const reader = new FrameReader(conn);
  const hello = await reader.read();
  assert.equal(hello?.type, FRAME_TYPES.SERVER_HELLO);
  const nonce = decodeJsonBody(hello!).nonce as string;
  return { conn, reader, nonce };
}

/** Reads until the receiver closes; returns the ERROR it sent, if any, and how long it took. */
async function readUntilClosed(reader: FrameReader, conn: Deno.Conn, ms = 10_000) {
  const started = Date.now();
  let error: ErrorBody | undefined;
  let welcomed = false;
  const timer = setTimeout(() => conn.close(), ms);
  try {
    for (;;) {
      const frame = await reader.read();
      if (frame === undefined) break;
      if (frame.type === FRAME_TYPES.ERROR) error = decodeErrorBody(frame);
      if (frame.type === FRAME_TYPES.WELCOME) welcomed = true;
    }
  } catch {
    // Reset or truncated: closed all the same.
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch { /* closed */ }
  }
  const elapsedMs = Date.now() - started;
  assert.ok(elapsedMs < ms, "the receiver closed the connection");
  return { error, welcomed, elapsedMs };
}

async function helloFrame(key: ShipKey, serverNonce: string, hostId: string) {
  const nonceC = makeNonce();
  const server = Uint8Array.from(serverNonce.match(/../g)!.map((h) => parseInt(h, 16)));
  const proof = await clientProof(key, { server, client: nonceC }, hostId);
  return encodeJsonFrame(FRAME_TYPES.CLIENT_HELLO, {
    protocol: PROTOCOL_NAME,
    version: PROTOCOL_VERSION,
    entryFormatVersion: ENTRY_FORMAT_VERSION,
    manifestFormatVersion: MANIFEST_FORMAT_VERSION,
    hostId,
    logdirId: "0f0e0d0c-0000-4000-8000-000000000000",
    deviceBytes: 1024 * 1024,
    sectorBytes: 512,
    nonce: toHex(nonceC),
    proof: toHex(proof),
    force: false,
  });
}

Deno.test("bad input on the receive port is refused with a logged reason, other hosts unaffected", async () => {
  await withTempDir((dir) =>
    withSeed(async (random) => {
      await writeKey(join(dir, "ship.key"), random);
      await writeKey(join(dir, "wrong.key"), random);
      const key = await loadKeyFile(join(dir, "ship.key"));
      const wrongKey = await loadKeyFile(join(dir, "wrong.key"));
      const good = await makeSource(dir, "good", random);
      await writeEntries(good, random, 40);
      const storedir = join(dir, "store");
      const events: ReceiverEvent[] = [];
      const receiver = await startReceiver(storedir, events, {
        key,
        limits: { handshakeMsMax: 1_000, idleMsMax: 2_000 },
      });
      const port = receiver.addr.port;
      const controller = new AbortController();
      const shipping = shipLogdir(good.logdir, target(receiver), {
        key,
        follow: true,
        signal: controller.signal,
      });
      try {
        const attacks = {
          async randomBytes() {
            const { conn, reader } = await rawConnect(port);
            const garbage = new Uint8Array(3000);
            random.fill(garbage);
            await writeAll(conn, garbage);
            return await readUntilClosed(reader, conn);
          },
          async oversized() {
            const { conn, reader } = await rawConnect(port);
            await writeAll(
              conn,
              new Uint8Array([0x7f, 0xff, 0xff, 0xff, FRAME_TYPES.CLIENT_HELLO]),
            );
            return await readUntilClosed(reader, conn);
          },
          async truncated() {
            const { conn, reader, nonce } = await rawConnect(port);
            await writeAll(conn, (await helloFrame(key, nonce, "trunc")).subarray(0, 30));
            await conn.closeWrite();
            return await readUntilClosed(reader, conn);
          },
          async replayed() {
            const first = await rawConnect(port);
            const hello = await helloFrame(key, first.nonce, "replayer");
            await writeAll(first.conn, hello);
            const welcomed = await readUntilClosedAfter(first, 300);
            assert.ok(welcomed, "the original handshake is welcomed");
            const second = await rawConnect(port);
            await writeAll(second.conn, hello);
            return await readUntilClosed(second.reader, second.conn);
          },
          async evilHostId() {
            const { conn, reader, nonce } = await rawConnect(port);
            await writeAll(conn, await helloFrame(key, nonce, "../evil"));
            return await readUntilClosed(reader, conn);
          },
          async wrongKey() {
            const { conn, reader, nonce } = await rawConnect(port);
            await writeAll(conn, await helloFrame(wrongKey, nonce, "intruder"));
            return await readUntilClosed(reader, conn);
          },
          async silent() {
            const { conn, reader } = await rawConnect(port);
            return await readUntilClosed(reader, conn);
          },
          async idleAfterWelcome() {
            const { conn, reader, nonce } = await rawConnect(port);
            await writeAll(conn, await helloFrame(key, nonce, "idler"));
            return await readUntilClosed(reader, conn);
          },
        };
        const names = Object.keys(attacks) as (keyof typeof attacks)[];
        const writing = writeEntries(good, random, 60);
        const outcomes = await Promise.all(names.map((name) => attacks[name]()));
        await writing;
        const byName = Object.fromEntries(names.map((name, i) => [name, outcomes[i]]));
        assert.equal(byName.randomBytes.error?.code, "protocol");
        assert.equal(byName.oversized.error?.code, "protocol");
        assert.equal(byName.truncated.error?.code, "protocol");
        assert.equal(byName.replayed.error?.code, "auth");
        assert.equal(byName.evilHostId.error?.code, "host");
        assert.equal(byName.wrongKey.error?.code, "auth");
        assert.equal(byName.silent.error?.code, "limit");
        assert.ok(
          byName.silent.elapsedMs >= 900,
          `silent client closed after ${byName.silent.elapsedMs} ms`,
        );
        assert.ok(byName.idleAfterWelcome.welcomed);
        assert.equal(byName.idleAfterWelcome.error?.code, "limit");
        const log = messages(events);
        for (
          const reason of [
            /CLIENT_HELLO frame announces 2147483647 bytes/,
            /Truncated frame/,
            /Authentication failed for host "replayer"/,
            /Invalid host id "\.\.\/evil"/,
            /Authentication failed for host "intruder"/,
            /the handshake took longer than 1000 ms/,
            /Closed the connection of host idler .*no frame for 2000 ms/,
          ]
        ) {
          assert.match(log, reason);
        }
        await waitUntil(
          async () => (await copyLastSeq(storedir, "good")) === (await lastSeqOf(good.logdir)),
          "the good host to catch up",
        );
      } finally {
        controller.abort();
        await shipping.catch(() => {});
        await receiver.close();
      }
      const result = await shipping;
      assert.equal(result.sessions, 1, "the good host never lost its connection");
      assert.deepEqual(listNames(storedir), ["good"], messages(events));
      assert.deepEqual(
        listNames(dir).filter((name) => !/^(good|store|ship\.key|wrong\.key)/.test(name)),
        [],
      );
      await assertSameRestores(
        good.logdir,
        join(storedir, "good"),
        dir,
        await restorePoints(good.logdir),
      );
    })
  );
});

/** Reads frames for `ms` after a hello; returns true if WELCOME came; closes. */
async function readUntilClosedAfter(
  client: { conn: Deno.Conn; reader: FrameReader },
  ms: number,
): Promise<boolean> {
  let welcomed = false;
  const timer = setTimeout(() => client.conn.close(), ms);
  try {
    for (;;) {
      const frame = await client.reader.read();
      if (frame === undefined) break;
      if (frame.type === FRAME_TYPES.WELCOME) {
        welcomed = true;
        break;
      }
    }
  } catch {
    // Closed by the timer.
  } finally {
    clearTimeout(timer);
    try {
      client.conn.close();
    } catch { /* closed */ }
  }
  return welcomed;
}

Deno.test("shipLogdir() refuses a copy that diverged from the source unless force", async () => {
  await withTempDir((dir) =>
    withSeed(async (random) => {
      const source = await makeSource(dir, "vm6", random);
      await writeEntries(source, random, 40);
      // A copy of the logdir as it is now: later it takes other entries under the same seqs, as a
      // source restored from an old backup (or one that lost unflushed entries) would.
      const rewound = {
        ...source,
        image: join(dir, "rewound.img"),
        logdir: join(dir, "rewound-log"),
      };
      const copied = await run("cp", ["-a", source.image, rewound.image]);
      assert.equal(copied.code, 0, copied.stderr);
      assert.equal((await run("cp", ["-a", source.logdir, rewound.logdir])).code, 0);
      await writeEntries(source, random, 30);
      await writeEntries(rewound, random, 50);
      const storedir = join(dir, "store");
      const events: ReceiverEvent[] = [];
      const receiver = await startReceiver(storedir, events);
      try {
        await shipLogdir(source.logdir, target(receiver));
        await assert.rejects(
          () => shipLogdir(rewound.logdir, target(receiver)),
          (error: Error) => {
            assert.equal(error.name, "UsageError");
            assert.match(error.message, /the receiver's copy has diverged from it/);
            return true;
          },
        );
        await assertSameRestores(source.logdir, join(storedir, "vm6"), dir, [undefined]);
        const forced = await shipLogdir(rewound.logdir, target(receiver), { force: true });
        assert.equal(forced.statesSent, 1);
        assert.equal(forced.baseBytesSent, 0, "the same base is linked, not sent again");
      } finally {
        await receiver.close();
      }
      await assertSameRestores(
        rewound.logdir,
        join(storedir, "vm6"),
        dir,
        await restorePoints(rewound.logdir),
      );
    })
  );
});

Deno.test("the receiver refuses connections over its limit and serves again once one closes", async () => {
  await withTempDir(async (dir) => {
    const events: ReceiverEvent[] = [];
    const receiver = await startReceiver(join(dir, "store"), events, {
      limits: { connectionsMax: 1 },
    });
    try {
      const first = await rawConnect(receiver.addr.port);
      const second = await Deno.connect({ hostname: "127.0.0.1", port: receiver.addr.port });
      const refused = await readUntilClosed(new FrameReader(second), second);
      assert.equal(refused.error?.code, "limit");
      assert.match(messages(events), /1 connections open, the limit is 1/);
      first.conn.close();
      await waitUntil(async () => {
        const third = await Deno.connect({ hostname: "127.0.0.1", port: receiver.addr.port });
        const frame = await new FrameReader(third).read().catch(() => undefined);
        third.close();
        return frame?.type === FRAME_TYPES.SERVER_HELLO;
      }, "a free connection slot");
    } finally {
      await receiver.close();
    }
  });
});
