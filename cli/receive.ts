/**
 * `sectorlog receive <storedir> --listen HOST:PORT [--store s3://bucket/prefix]`: keep the shipped
 * logs of many hosts, and with `--store` upload each host's logdir to object storage too.
 */
import { Command, Option } from "commander";
import { UsageError } from "../lib/errors.ts";
import { parseHostPort } from "../lib/address.ts";
import { loadKeyFile, type ShipKey } from "../lib/ship/auth.ts";
import { type HostUpload, StoreUploader, type UploadRound } from "../lib/store/receive_to_store.ts";
import { isS3Url } from "../lib/store/s3_url.ts";
import { FOLLOW_MAX_LAG_MS_MAX, type StoreLogdir } from "../lib/store/store_logdir.ts";
import { parseDuration } from "../lib/time.ts";
import {
  RECEIVE_CONNECTIONS_MAX,
  RECEIVE_HANDSHAKE_MS_MAX,
  RECEIVE_IDLE_MS_MAX,
  Receiver,
  type ReceiverLimits,
} from "../lib/ship/receiver.ts";
import { parseIntegerOption } from "./_errors.ts";
import { formatBytes, print, say } from "./_output.ts";
import { openStoreLogdir, type S3Flags, withS3Options } from "./_s3.ts";
import { waitForStopSignal } from "./_signals.ts";

interface ReceiveFlags extends S3Flags {
  listen?: string;
  keyFile?: string;
  tlsCert?: string;
  tlsKey?: string;
  allowHost: string[];
  handshakeTimeoutMs: string;
  idleTimeoutMs: string;
  connectionsMax: string;
  segmentBytesMax?: string;
  verbose?: boolean;
  json?: boolean;
  store?: string;
  maxLag?: string;
}

/** Builds the `receive` command. */
export function receiveCommand(): Command {
  return withS3Options(new Command("receive"))
    .description(
      "accept shipped journals over TCP and keep each host's as a logdir in <storedir>/<host-id>/",
    )
    .argument("<storedir>", "store directory (created if missing)")
    .option("--listen <host:port>", "TCP address to listen on")
    .option("--key-file <file>", "require senders to prove this shared key (HMAC, both ways)")
    .option("--tls-cert <file>", "serve TLS with this certificate chain (PEM)")
    .option("--tls-key <file>", "private key of --tls-cert (PEM)")
    .option(
      "--allow-host <id>",
      "accept only this host id (repeat for more)",
      (value: string, previous: string[]) => [...previous, value],
      [] as string[],
    )
    .option(
      "--handshake-timeout-ms <ms>",
      "close connections that do not finish the handshake in time",
      String(RECEIVE_HANDSHAKE_MS_MAX),
    )
    .option(
      "--idle-timeout-ms <ms>",
      "close connections idle this long",
      String(RECEIVE_IDLE_MS_MAX),
    )
    .option("--connections-max <n>", "most connections at once", String(RECEIVE_CONNECTIONS_MAX))
    .addOption(new Option("--segment-bytes-max <bytes>").hideHelp())
    .option(
      "--store <s3-url>",
      "also upload each host's logdir to s3://bucket/prefix/<host-id> continuously; <storedir> is the spool",
    )
    .option(
      "--max-lag <duration>",
      "with --store: start an upload round at least this often, the RPO (default 2s)",
    )
    .option("--verbose", "log every connection and batch, and every upload round")
    .option("--json", "print JSON lines on stdout: listening, upload rounds, stopped")
    .addHelpText(
      "after",
      "\nExample:\n  sectorlog receive /srv/sectorlog --listen 0.0.0.0:7420 --key-file /etc/sectorlog/ship.key \\\n" +
        "    --tls-cert /etc/sectorlog/cert.pem --tls-key /etc/sectorlog/key.pem\n" +
        "  sectorlog restore /srv/sectorlog/vm1 /tmp/vm1.img --at -2h\n" +
        "  sectorlog receive /srv/spool --listen 0.0.0.0:7420 --store s3://backups/hosts --max-lag 2s\n" +
        "  sectorlog restore s3://backups/hosts/vm1 /tmp/vm1.img --at -2h\n" +
        "\nSIGINT/SIGTERM stop it cleanly: batches in flight are fsynced and acked, then connections close;\n" +
        "with --store, a last upload round then puts everything received into the store.\n" +
        "The store and its credentials are checked before listening (exit 1 when they fail).\n",
    )
    .action(async (storedir: string, flags: ReceiveFlags) => {
      if (flags.listen === undefined) {
        throw new UsageError("Cannot start receive: --listen HOST:PORT is required");
      }
      const listen = parseHostPort(flags.listen, "--listen");
      const key: ShipKey | undefined = flags.keyFile === undefined
        ? undefined
        : await loadKeyFile(flags.keyFile);
      const tls = await loadTls(flags);
      const limits: Partial<ReceiverLimits> = {
        handshakeMsMax: positive(flags.handshakeTimeoutMs, "--handshake-timeout-ms"),
        idleMsMax: positive(flags.idleTimeoutMs, "--idle-timeout-ms"),
        connectionsMax: positive(flags.connectionsMax, "--connections-max"),
      };
      const segmentBytesMax = flags.segmentBytesMax === undefined
        ? undefined
        : positive(flags.segmentBytesMax, "--segment-bytes-max");
      const maxLagMs = maxLagOption(flags);
      const target = flags.store === undefined
        ? undefined
        : await openStoreLogdir(flags.store, flags, "--store");
      try {
        // Checked before anything listens: a sender must not be acked into a spool that never drains.
        await target?.store.check();
        await receive(storedir, flags, {
          listen,
          key,
          tls,
          limits,
          segmentBytesMax,
          target,
          maxLagMs,
        });
      } finally {
        target?.store.close();
      }
    });
}

interface ReceiveSetup {
  listen: { hostname: string; port: number };
  key: ShipKey | undefined;
  tls: { certPem: string; keyPem: string } | undefined;
  limits: Partial<ReceiverLimits>;
  segmentBytesMax: number | undefined;
  /** With --store: where hosts are uploaded, every maxLagMs. */
  target: StoreLogdir | undefined;
  maxLagMs: number;
}

async function receive(storedir: string, flags: ReceiveFlags, setup: ReceiveSetup): Promise<void> {
  const { listen, key, tls, target, maxLagMs } = setup;
  const receiver = await Receiver.start({
    storedir,
    hostname: listen.hostname,
    port: listen.port,
    key,
    tls,
    allowHosts: flags.allowHost.length > 0 ? flags.allowHost : undefined,
    limits: setup.limits,
    segmentBytesMax: setup.segmentBytesMax,
    onEvent: (event) => {
      if (event.level === "debug" && flags.verbose !== true) return;
      say(`sectorlog receive: ${event.message}`);
    },
  });
  const addr = receiver.addr;
  const uploader = target === undefined
    ? undefined
    : new StoreUploader(storedir, target, { sealer: receiver, maxLagMs });
  const storeUrl = uploader === undefined ? undefined : url(uploader.target);
  if (flags.json === true) {
    print(JSON.stringify({
      event: "listening",
      listening: `${addr.hostname}:${addr.port}`,
      storedir,
      store: storeUrl,
      maxLagMs: uploader === undefined ? undefined : maxLagMs,
    }));
  }
  say(
    `sectorlog receive: listening on ${addr.hostname}:${addr.port} (${
      tls === undefined ? "plain TCP" : "TLS"
    }, ${key === undefined ? "no key" : "key required"}), storing hosts in ${storedir}${
      storeUrl === undefined
        ? ""
        : ` and uploading them to ${storeUrl}/<host-id> every ${maxLagMs} ms (the RPO)`
    }`,
  );
  const reporter = new RoundReporter(flags, maxLagMs);
  const stopUploads = new AbortController();
  const uploads = uploader?.follow(stopUploads.signal, (round) => reporter.round(round));
  await waitForStopSignal(receiver.finished);
  say(
    "sectorlog receive: stopping: fsyncing and acking batches in flight, closing connections",
  );
  stopUploads.abort();
  await receiver.close();
  if (uploader !== undefined) {
    await uploads;
    say(`sectorlog receive: last upload round to ${storeUrl}`);
    const last = await uploader.round();
    reporter.round(last);
    if (last.failed > 0) {
      Deno.exitCode = 1;
      say(
        `sectorlog receive: ${last.failed} host(s) not uploaded; ${storedir} keeps them, the next start uploads them`,
      );
    }
  }
  if (flags.json === true) print(JSON.stringify({ event: "stopped", ...reporter.totals }));
  say(Deno.exitCode === 0 ? "sectorlog receive: stopped cleanly" : "sectorlog receive: stopped");
}

function url(target: StoreLogdir): string {
  return target.store.describe(target.prefix === "" ? "" : `${target.prefix}/`).replace(/\/$/, "");
}

function maxLagOption(flags: ReceiveFlags): number {
  if (flags.store !== undefined && !isS3Url(flags.store)) {
    throw new UsageError(
      `Invalid --store ${JSON.stringify(flags.store)}: expected s3://bucket/prefix`,
    );
  }
  if (flags.maxLag !== undefined && flags.store === undefined) {
    throw new UsageError("Invalid --max-lag: it only applies with --store");
  }
  const maxLagMs = parseDuration(flags.maxLag ?? "2s") / 1000;
  if (maxLagMs < 1000 || maxLagMs > FOLLOW_MAX_LAG_MS_MAX) {
    throw new UsageError(`Invalid --max-lag ${JSON.stringify(flags.maxLag)}: use 1s to 24h`);
  }
  return maxLagMs;
}

/**
 * Upload rounds on stderr and (with --json) stdout: a host's failure once when it starts or its
 * reason changes, and once more when the host catches up; with --verbose every upload.
 */
class RoundReporter {
  #flags: ReceiveFlags;
  #maxLagMs: number;
  /** Per failing host, the reason last printed. */
  #failing = new Map<string, string>();
  totals = { rounds: 0, objectsUploaded: 0, bytesUploaded: 0, failedRounds: 0 };

  constructor(flags: ReceiveFlags, maxLagMs: number) {
    this.#flags = flags;
    this.#maxLagMs = maxLagMs;
  }

  round(round: UploadRound): void {
    this.totals.rounds++;
    this.totals.objectsUploaded += round.objectsUploaded;
    this.totals.bytesUploaded += round.bytesUploaded;
    if (round.failed > 0) this.totals.failedRounds++;
    const lagMsMax = round.lagMs + this.#maxLagMs;
    const changed = round.hosts.some((host) => host.status !== "unchanged");
    if (this.#flags.json === true && changed) {
      print(JSON.stringify({
        event: "round",
        round: round.round,
        lagMs: round.lagMs,
        lagMsMax,
        objectsUploaded: round.objectsUploaded,
        bytesUploaded: round.bytesUploaded,
        failed: round.failed,
        hosts: round.hosts.filter((host) => host.status !== "unchanged").map(hostJson),
      }));
    }
    for (const host of round.hosts) this.#host(host, lagMsMax);
  }

  #host(host: HostUpload, lagMsMax: number): void {
    if (host.status === "failed") {
      if (this.#failing.get(host.hostId) === host.error) return;
      this.#failing.set(host.hostId, host.error!);
      say(
        `sectorlog receive: upload of host ${host.hostId} to ${host.target} failed, ${
          host.transient === true ? "the next round retries" : "retrying every round"
        }: ${host.error}`,
      );
      return;
    }
    if (host.status !== "uploaded") return;
    const result = host.result!;
    if (this.#failing.delete(host.hostId)) {
      say(
        `sectorlog receive: upload of host ${host.hostId} caught up: ${host.target} holds seq ${result.lastSeq}`,
      );
    } else if (this.#flags.verbose === true && result.objectsUploaded > 0) {
      say(
        `sectorlog receive: ${host.target} holds host ${host.hostId} up to seq ${result.lastSeq} (${result.objectsUploaded} objects, ${
          formatBytes(result.bytesUploaded)
        }), lag at most ${lagMsMax} ms`,
      );
    }
  }
}

function hostJson(host: HostUpload): Record<string, unknown> {
  return {
    hostId: host.hostId,
    target: host.target,
    status: host.status,
    lastSeq: host.result?.lastSeq,
    objectsUploaded: host.result?.objectsUploaded,
    bytesUploaded: host.result?.bytesUploaded,
    manifestUploaded: host.result?.manifestUploaded,
    error: host.error,
    transient: host.transient,
  };
}

function positive(value: string, option: string): number {
  const number = parseIntegerOption(value, option);
  if (number < 1) throw new UsageError(`Invalid ${option} ${value}: expected at least 1`);
  return number;
}

async function loadTls(
  flags: ReceiveFlags,
): Promise<{ certPem: string; keyPem: string } | undefined> {
  if (flags.tlsCert === undefined && flags.tlsKey === undefined) return undefined;
  if (flags.tlsCert === undefined || flags.tlsKey === undefined) {
    throw new UsageError("Cannot start receive: give both --tls-cert and --tls-key, or neither");
  }
  const read = async (path: string, option: string) => {
    try {
      return await Deno.readTextFile(path);
    } catch (error) {
      throw new UsageError(`Cannot read ${option} ${path}: ${(error as Error).message}`);
    }
  };
  return {
    certPem: await read(flags.tlsCert, "--tls-cert"),
    keyPem: await read(flags.tlsKey, "--tls-key"),
  };
}
