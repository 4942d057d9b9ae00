import assert from "node:assert/strict";
import { join } from "node:path";
import { LogAssistedDisk } from "../lib/disk.ts";
import { readManifest } from "../lib/format/logdir.ts";
import { writeAll } from "../lib/ship/wire.ts";
import { Random, withSeed, withTempDir } from "./_helpers.ts";
import { sleep } from "./_watch_harness.ts";
import {
  applyRandomOp,
  assertSameRestores,
  CliProcess,
  copyLastSeq,
  lastSeqOf,
  makeSource,
  type Source,
  SOURCE_SEGMENT_BYTES_MAX,
  startReceive,
  waitUntil,
  writeEntries,
} from "./_ship_harness.ts";

/** Appends to a source through the log-assisted disk until stopped. */
class Writer {
  readonly source: Source;
  #stopped = false;
  #done: Promise<void>;
  ops = 0;

  constructor(source: Source, random: Random) {
    this.source = source;
    this.#done = this.#run(random);
  }

  async #run(random: Random): Promise<void> {
    const disk = await LogAssistedDisk.open(this.source.image, this.source.logdir, {
      segmentBytesMax: SOURCE_SEGMENT_BYTES_MAX,
    });
    try {
      while (!this.#stopped) {
        await applyRandomOp(disk, random, `${this.source.hostId}-${this.ops}`);
        this.ops++;
        if (this.ops % 8 === 0) await sleep(random.int(0, 4));
      }
    } finally {
      await disk.close();
    }
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    await this.#done;
  }
}

/**
 * A loopback TCP proxy that cuts every connection after a random time (both directions at once),
 * like a flaky network, until `cutsMax` cuts; after that it forwards faithfully.
 */
class CuttingProxy {
  readonly listener: Deno.Listener;
  readonly upstreamPort: number;
  cuts = 0;
  #cutsMax: number;
  #random: Random;
  #conns = new Set<Deno.Conn>();
  #tasks = new Set<Promise<void>>();
  #accepting: Promise<void>;

  constructor(upstreamPort: number, random: Random, cutsMax: number) {
    this.listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    this.upstreamPort = upstreamPort;
    this.#random = random;
    this.#cutsMax = cutsMax;
    this.#accepting = this.#accept();
  }

  get port(): number {
    return (this.listener.addr as Deno.NetAddr).port;
  }

  async #accept(): Promise<void> {
    for (;;) {
      let client: Deno.Conn;
      try {
        client = await this.listener.accept();
      } catch {
        return;
      }
      const task = this.#serve(client);
      this.#tasks.add(task);
      task.finally(() => this.#tasks.delete(task));
    }
  }

  async #serve(client: Deno.Conn): Promise<void> {
    let upstream: Deno.Conn;
    try {
      upstream = await Deno.connect({ hostname: "127.0.0.1", port: this.upstreamPort });
    } catch {
      this.#close(client);
      return;
    }
    this.#conns.add(client);
    this.#conns.add(upstream);
    const cut = () => {
      this.#close(client);
      this.#close(upstream);
    };
    let timer: ReturnType<typeof setTimeout> | undefined;
    if (this.cuts < this.#cutsMax) {
      timer = setTimeout(() => {
        this.cuts++;
        cut();
      }, this.#random.int(50, 900));
    }
    await Promise.all([pump(client, upstream), pump(upstream, client)]).finally(() => {
      clearTimeout(timer);
      cut();
    });
  }

  #close(conn: Deno.Conn): void {
    this.#conns.delete(conn);
    try {
      conn.close();
    } catch {
      // Already closed.
    }
  }

  async close(): Promise<void> {
    this.listener.close();
    await this.#accepting;
    for (const conn of [...this.#conns]) this.#close(conn);
    await Promise.all([...this.#tasks]);
  }
}

async function pump(from: Deno.Conn, to: Deno.Conn): Promise<void> {
  const buffer = new Uint8Array(64 * 1024);
  try {
    for (;;) {
      const count = await from.read(buffer);
      if (count === null) return;
      await writeAll(to, buffer.subarray(0, count));
    }
  } catch {
    // A cut or a peer reset ends the pump.
  }
}

function shipArgs(source: Source, port: number): string[] {
  return ["ship", source.logdir, `127.0.0.1:${port}`, "--follow", "--report-interval", "1"];
}

Deno.test("three hosts ship with --follow through receiver and sender kill -9 and cut connections, and every copy is exact", async () => {
  await withTempDir((dir) =>
    withSeed(async (random) => {
      const sources: Source[] = [];
      for (const hostId of ["alpha", "bravo", "charlie"]) {
        const source = await makeSource(dir, hostId, random);
        await writeEntries(source, random, 30);
        sources.push(source);
      }
      const [alpha, bravo, charlie] = sources;
      const storedir = join(dir, "store");
      const receiveArgs = ["--segment-bytes-max", String(64 * 1024)];
      let { process: receive, port } = await startReceive(storedir, receiveArgs);
      const proxy = new CuttingProxy(port, new Random(random.int(0, 2 ** 30)), 8);
      const senders = new Map<string, CliProcess>([
        ["alpha", new CliProcess(shipArgs(alpha, port))],
        ["bravo", new CliProcess(shipArgs(bravo, port))],
        ["charlie", new CliProcess(shipArgs(charlie, proxy.port))],
      ]);
      const writers = sources.map((s) => new Writer(s, new Random(random.int(0, 2 ** 30))));
      let receiverKilled = "";
      try {
        for (const host of ["alpha", "bravo"]) {
          await receive.waitFor(new RegExp(`Host ${host}: installed its base`));
        }
        await sleep(1_500);

        // kill -9 the receiver mid-stream while the logdirs keep growing, then restart it.
        await receive.stop("SIGKILL");
        receiverKilled = receive.stderr;
        await sleep(400);
        ({ process: receive } = await startReceive(storedir, receiveArgs, port));
        for (const host of ["alpha", "bravo"]) {
          await receive.waitFor(new RegExp(`Host ${host} connected from`));
        }

        // kill -9 a sender, then restart it.
        await sleep(500);
        await senders.get("bravo")!.stop("SIGKILL");
        await sleep(300);
        senders.set("bravo", new CliProcess(shipArgs(bravo, port)));
        await sleep(1_500);
      } finally {
        await Promise.all(writers.map((writer) => writer.stop()));
      }
      try {
        for (const source of sources) {
          const expected = await lastSeqOf(source.logdir);
          await waitUntil(
            async () => (await copyLastSeq(storedir, source.hostId)) === expected,
            `${source.hostId} to catch up to seq ${expected}`,
          );
        }
        for (const [host, sender] of senders) {
          const status = await sender.stop("SIGTERM");
          assert.equal(status.code, 0, `ship ${host}: ${sender.stderr}`);
        }
        assert.equal((await receive.stop("SIGTERM")).code, 0, receive.stderr);
      } catch (error) {
        (error as Error).message +=
          `\nreceiver before kill:\n${receiverKilled}\nreceiver:\n${receive.stderr}\n` +
          [...senders].map(([host, s]) => `ship ${host}:\n${s.stderr}`).join("\n");
        throw error;
      } finally {
        for (const sender of senders.values()) await sender.close();
        await receive.close();
        await proxy.close();
      }
      assert.ok(proxy.cuts > 0, "the proxy cut connections");
      assert.match(senders.get("alpha")!.stderr, /connection lost .*reconnecting in \d+ ms/);
      assert.match(senders.get("charlie")!.stderr, /connection lost/);
      for (const writer of writers) assert.ok(writer.ops > 100, `${writer.source.hostId} grew`);
      for (const source of sources) {
        const copy = join(storedir, source.hostId);
        assert.equal(
          (await readManifest(copy)).logdirId,
          (await readManifest(source.logdir)).logdirId,
        );
        // Exactness at many points is ship_test's job; here the latest state and one in the
        // middle of the faults, whose restores replay thousands of entries.
        const middle = Math.floor((await lastSeqOf(source.logdir)) / 2);
        await assertSameRestores(source.logdir, copy, dir, [undefined, {
          kind: "seq",
          seq: middle,
        }]);
      }
    })
  );
});
