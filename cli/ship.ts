/** `sectorlog ship <logdir> <host:port> [--follow]`: send a journal to a receiver. */
import { Command } from "commander";
import { UsageError } from "../lib/errors.ts";
import { parseHostPort } from "../lib/address.ts";
import { loadKeyFile } from "../lib/ship/auth.ts";
import { type ShipEvent, shipLogdir, type ShipOptions } from "../lib/ship/sender.ts";
import { isS3Url } from "../lib/store/s3_url.ts";
import {
  FOLLOW_MAX_LAG_MS_MAX,
  followToStore,
  objectKey,
  shipToStore,
  type StoreLogdir,
} from "../lib/store/store_logdir.ts";
import { formatTimeUtc, parseDuration } from "../lib/time.ts";
import { parseIntegerOption } from "./_errors.ts";
import { formatBytes, print, printJson, type Progress, progressBar, say } from "./_output.ts";
import { openStoreLogdir, type S3Flags, withS3Options } from "./_s3.ts";

interface ShipFlags extends S3Flags {
  follow?: boolean;
  hostId?: string;
  keyFile?: string;
  tls?: boolean;
  tlsCa?: string;
  force?: boolean;
  json?: boolean;
  reportInterval: string;
  maxLag?: string;
}

/** Builds the `ship` command. */
export function shipCommand(): Command {
  return withS3Options(new Command("ship"))
    .description(
      "send a logdir's base and entries to a `sectorlog receive` or to object storage (s3://), resuming where it stopped",
    )
    .argument("<logdir>", "log directory to ship (read only: ship never deletes anything)")
    .argument(
      "<host:port>",
      "address of the receiver, or s3://bucket/prefix (one-shot: seals the live segment, uploads what the bucket lacks, the manifest last)",
    )
    .option("--follow", "keep tailing the logdir as watch appends, reconnecting after failures")
    .option("--host-id <id>", "host id on the receiver (default: the logdir's host id)")
    .option("--key-file <file>", "prove this shared key to the receiver and require its proof")
    .option("--tls", "connect with TLS, trusting the system's CA certificates")
    .option("--tls-ca <file>", "connect with TLS, trusting this CA certificate (PEM)")
    .option("--force", "replace the receiver's copy of another logdir under the same host id")
    .option("--json", "print a JSON summary on stdout (with --follow also one line per report)")
    .option("--report-interval <seconds>", "how often --follow reports lag", "10")
    .option(
      "--max-lag <duration>",
      "with --follow to s3://: ship a round at least this often, the RPO (default 2s)",
    )
    .addHelpText(
      "after",
      "\nExamples:\n  sectorlog ship /var/lib/sectorlog/vm1 backup.example:7420 --key-file /etc/sectorlog/ship.key\n" +
        "  sectorlog ship /var/lib/sectorlog/vm1 backup.example:7420 --follow --tls-ca /etc/sectorlog/ca.pem\n" +
        "  sectorlog ship /var/lib/sectorlog/vm1 s3://backups/vm1 --s3-endpoint http://127.0.0.1:8080\n" +
        "  sectorlog ship /var/lib/sectorlog/vm1 s3://backups/vm1 --follow --max-lag 2s\n" +
        "\nExit codes: 0 everything acked, 1 network failure, 2 refused (key, host id, identity), 3 corrupt entry, 4 host busy\n",
    )
    .action(async (logdir: string, address: string, flags: ShipFlags) => {
      if (isS3Url(address)) return await shipToS3(logdir, address, flags);
      const target = parseHostPort(address, "<host:port>");
      const reportMs = parseIntegerOption(flags.reportInterval, "--report-interval") * 1000;
      if (reportMs < 1000) throw new UsageError("Invalid --report-interval: expected at least 1");
      const controller = new AbortController();
      const stopOnSignal = () => controller.abort();
      if (flags.follow === true) {
        Deno.addSignalListener("SIGINT", stopOnSignal);
        Deno.addSignalListener("SIGTERM", stopOnSignal);
      }
      const reporter = new ShipReporter(flags, reportMs);
      const options: ShipOptions = {
        hostId: flags.hostId,
        key: flags.keyFile === undefined ? undefined : await loadKeyFile(flags.keyFile),
        tls: await tlsOptions(flags),
        force: flags.force,
        follow: flags.follow,
        signal: controller.signal,
        onEvent: (event) => reporter.event(event),
      };
      let result;
      try {
        result = await shipLogdir(logdir, target, options);
      } finally {
        reporter.stop();
        if (flags.follow === true) {
          Deno.removeSignalListener("SIGINT", stopOnSignal);
          Deno.removeSignalListener("SIGTERM", stopOnSignal);
        }
      }
      if (flags.json === true) {
        printJson({ command: "ship", ...result });
        return;
      }
      say(
        `sectorlog ship: ${result.target} holds host ${result.hostId} up to seq ${result.lastSeq}: ${result.entriesSent} entries (${
          formatBytes(result.entryBytesSent)
        }) sent${
          result.statesSent > 0 ? `, ${formatBytes(result.baseBytesSent)} of base` : ""
        } in ${result.durationMs} ms`,
      );
    });
}

/** `ship <logdir> s3://bucket/prefix`: one upload round, or rounds every --max-lag with --follow. */
async function shipToS3(logdir: string, url: string, flags: ShipFlags): Promise<void> {
  const unsupported = (
    [
      ["--host-id", flags.hostId],
      ["--key-file", flags.keyFile],
      ["--tls", flags.tls],
      ["--tls-ca", flags.tlsCa],
      ["--force", flags.force],
    ] as const
  ).find(([, value]) => value !== undefined);
  if (unsupported !== undefined) {
    throw new UsageError(`Cannot use ${unsupported[0]} when shipping to ${url}`, {
      hint: "object storage takes --follow and --max-lag; identity comes from the logdir",
    });
  }
  if (flags.maxLag !== undefined && flags.follow !== true) {
    throw new UsageError("Invalid --max-lag: it only applies with --follow");
  }
  const maxLagMs = parseDuration(flags.maxLag ?? "2s") / 1000;
  if (maxLagMs < 1000 || maxLagMs > FOLLOW_MAX_LAG_MS_MAX) {
    throw new UsageError(`Invalid --max-lag ${JSON.stringify(flags.maxLag)}: use 1s to 24h`);
  }
  const target = await openStoreLogdir(url, flags, "<host:port>");
  if (flags.follow === true) {
    try {
      return await followShipToS3(logdir, target, flags, maxLagMs);
    } finally {
      target.store.close();
    }
  }
  const progress = progressBar("ship", flags.json !== true);
  let result;
  try {
    result = await shipToStore(logdir, target, {
      onProgress: (done, total) => progress.update(done, total),
      onRetry: ({ error, attempt, delayMs }) => {
        progress.stop();
        say(`sectorlog ship: ${error.message}; retrying in ${delayMs} ms (attempt ${attempt})`);
      },
    });
  } finally {
    progress.stop();
    target.store.close();
  }
  if (result.sealNote !== undefined) {
    say(
      `sectorlog ship: warning: the live segment was not sealed, so not shipped: ${result.sealNote}`,
    );
  }
  if (flags.json === true) {
    printJson({ command: "ship", ...result });
    return;
  }
  say(
    `sectorlog ship: ${result.target} holds ${result.hostId} up to seq ${result.lastSeq}: ${result.objectsUploaded} objects (${
      formatBytes(result.bytesUploaded)
    }) uploaded, ${result.objectsPresent} already there${
      result.manifestUploaded ? ", manifest updated" : ", manifest unchanged"
    }, in ${result.durationMs} ms`,
  );
  if (result.mode === "mirror" && result.objectsRetired > 0) {
    say(
      `sectorlog ship: the logdir no longer continues the store's log (a local compaction folded ` +
        `entries it never got): the store now mirrors it; ${result.objectsRetired} objects retired ` +
        "(the next `compact` of the store deletes them after its grace period)",
    );
  }
}

/** Rounds until SIGINT/SIGTERM; each round's lag on stderr (and a JSON line with --json). */
async function followShipToS3(
  logdir: string,
  target: StoreLogdir,
  flags: ShipFlags,
  maxLagMs: number,
): Promise<void> {
  const controller = new AbortController();
  const stop = () => controller.abort();
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  say(`sectorlog ship: following ${logdir} to ${url(target)} every ${maxLagMs} ms (the RPO)`);
  try {
    await followToStore(logdir, target, {
      maxLagMs,
      signal: controller.signal,
      onRetry: ({ error, attempt, delayMs }) =>
        say(`sectorlog ship: ${error.message}; retrying in ${delayMs} ms (attempt ${attempt})`),
      onRoundError: (error) =>
        say(`sectorlog ship: round failed, next round retries: ${error.message}`),
      onRound: (round) => {
        if (round.sealNote !== undefined) say(`sectorlog ship: warning: ${round.sealNote}`);
        if (flags.json === true) print(JSON.stringify({ event: "round", ...round }));
        else if (round.objectsUploaded > 0) {
          say(
            `sectorlog ship: up to seq ${round.lastSeq} in the store (${round.objectsUploaded} objects, ${
              formatBytes(round.bytesUploaded)
            }), lag at most ${round.lagMs + maxLagMs} ms`,
          );
        }
      },
    });
  } finally {
    Deno.removeSignalListener("SIGINT", stop);
    Deno.removeSignalListener("SIGTERM", stop);
  }
  say("sectorlog ship: stopped");
}

function url(target: StoreLogdir): string {
  return target.store.describe(objectKey(target, "")).replace(/\/$/, "");
}

async function tlsOptions(flags: ShipFlags): Promise<ShipOptions["tls"]> {
  if (flags.tlsCa !== undefined) {
    try {
      return { caCerts: [await Deno.readTextFile(flags.tlsCa)] };
    } catch (error) {
      throw new UsageError(`Cannot read --tls-ca ${flags.tlsCa}: ${(error as Error).message}`);
    }
  }
  return flags.tls === true ? {} : undefined;
}

/** Turns ship events into stderr lines, a progress bar and (with --json --follow) JSON lines. */
class ShipReporter {
  #flags: ShipFlags;
  #reportMs: number;
  #bar: Progress | undefined;
  #lastLineMs = 0;
  #caughtUpSaid = false;

  constructor(flags: ShipFlags, reportMs: number) {
    this.#flags = flags;
    this.#reportMs = reportMs;
  }

  event(event: ShipEvent): void {
    switch (event.kind) {
      case "connected":
        this.#connected(event);
        return;
      case "state":
        this.#progress(event.doneBytes, event.totalBytes, event.phase);
        return;
      case "progress":
        if (!event.caughtUp) this.#progress(event.ackedBytes, event.totalBytes, "entries");
        this.#lag(event);
        return;
      case "disconnected":
        this.stop();
        say(
          `sectorlog ship: connection lost (${event.error.message}); reconnecting in ${event.retryInMs} ms (attempt ${event.attempt})`,
        );
        return;
    }
  }

  #connected(event: Extract<ShipEvent, { kind: "connected" }>): void {
    const { plan, store } = event;
    const holds = store.present
      ? `the receiver holds seq ${store.applyFromSeq}..${store.lastSeq}`
      : "the receiver has no copy yet";
    if (plan.action === "resume") {
      say(
        `sectorlog ship: connected to ${event.address}: ${holds}; sending from seq ${plan.fromSeq}`,
      );
      return;
    }
    const what = `${
      plan.baseIncluded ? "the base snapshot" : "no base (the receiver has it)"
    }, ${plan.levels} level(s) and entries from seq ${plan.fromSeq}`;
    const why = plan.reason === "compacted"
      ? "the source was compacted past the receiver's copy"
      : plan.reason === "replaced"
      ? "--force: replacing the receiver's copy"
      : "new host";
    say(`sectorlog ship: connected to ${event.address}: ${holds}; ${why}: sending ${what}`);
    if (plan.horizonMove !== undefined) {
      const from = plan.horizonMove.fromUs === undefined
        ? "?"
        : formatTimeUtc(plan.horizonMove.fromUs);
      say(
        `sectorlog ship: the receiver's earliest restorable time moves from ${from} to ${
          formatTimeUtc(plan.horizonMove.toUs)
        }; history before it is no longer on the receiver`,
      );
    }
  }

  #progress(doneBytes: number, totalBytes: number, label: string): void {
    if (this.#flags.json === true) return;
    this.#bar ??= progressBar("ship");
    this.#bar.update(doneBytes, Math.max(totalBytes, doneBytes));
    void label;
  }

  #lag(event: Extract<ShipEvent, { kind: "progress" }>): void {
    if (this.#flags.follow !== true) return;
    const now = performance.now();
    if (event.caughtUp) {
      this.stop();
      if (this.#caughtUpSaid && now - this.#lastLineMs < this.#reportMs) return;
    } else if (now - this.#lastLineMs < this.#reportMs) {
      return;
    }
    this.#caughtUpSaid = event.caughtUp;
    this.#lastLineMs = now;
    const lag = event.lag;
    if (this.#flags.json === true) {
      print(JSON.stringify({ event: "lag", ackedSeq: event.ackedSeq, ...lag }));
      return;
    }
    if (Deno.stderr.isTerminal() && !event.caughtUp) return;
    say(
      `sectorlog ship: acked seq ${event.ackedSeq}; lag ${
        lag.exact ? "" : "≥ "
      }${lag.entries} entries, ${formatBytes(lag.bytes)}, ${lag.seconds.toFixed(1)} s`,
    );
  }

  stop(): void {
    this.#bar?.stop();
    this.#bar = undefined;
  }
}
