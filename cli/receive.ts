/** `sectorlog receive <storedir> --listen HOST:PORT`: keep the shipped logs of many hosts. */
import { Command, Option } from "commander";
import { UsageError } from "../lib/errors.ts";
import { parseHostPort } from "../lib/address.ts";
import { loadKeyFile, type ShipKey } from "../lib/ship/auth.ts";
import {
  RECEIVE_CONNECTIONS_MAX,
  RECEIVE_HANDSHAKE_MS_MAX,
  RECEIVE_IDLE_MS_MAX,
  Receiver,
  type ReceiverLimits,
} from "../lib/ship/receiver.ts";
import { parseIntegerOption } from "./_errors.ts";
import { say } from "./_output.ts";
import { waitForStopSignal } from "./_signals.ts";

interface ReceiveFlags {
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
}

/** Builds the `receive` command. */
export function receiveCommand(): Command {
  return new Command("receive")
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
    .option("--verbose", "log every connection and batch")
    .addHelpText(
      "after",
      "\nExample:\n  sectorlog receive /srv/sectorlog --listen 0.0.0.0:7420 --key-file /etc/sectorlog/ship.key \\\n" +
        "    --tls-cert /etc/sectorlog/cert.pem --tls-key /etc/sectorlog/key.pem\n" +
        "  sectorlog restore /srv/sectorlog/vm1 /tmp/vm1.img --at -2h\n" +
        "\nSIGINT/SIGTERM stop it cleanly: batches in flight are fsynced and acked, then connections close.\n",
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
      const receiver = await Receiver.start({
        storedir,
        hostname: listen.hostname,
        port: listen.port,
        key,
        tls,
        allowHosts: flags.allowHost.length > 0 ? flags.allowHost : undefined,
        limits,
        segmentBytesMax: flags.segmentBytesMax === undefined
          ? undefined
          : positive(flags.segmentBytesMax, "--segment-bytes-max"),
        onEvent: (event) => {
          if (event.level === "debug" && flags.verbose !== true) return;
          say(`sectorlog receive: ${event.message}`);
        },
      });
      const addr = receiver.addr;
      say(
        `sectorlog receive: listening on ${addr.hostname}:${addr.port} (${
          tls === undefined ? "plain TCP" : "TLS"
        }, ${key === undefined ? "no key" : "key required"}), storing hosts in ${storedir}`,
      );
      await waitForStopSignal(receiver.finished);
      say(
        "sectorlog receive: stopping: fsyncing and acking batches in flight, closing connections",
      );
      await receiver.close();
      say("sectorlog receive: stopped cleanly");
    });
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
