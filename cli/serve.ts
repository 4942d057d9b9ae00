/**
 * `sectorlog serve <logdir> --at TIME (--socket PATH | --listen HOST:PORT)`: a read-only NBD
 * export of the device as it was at TIME, read from the logdir without a restore.
 */
import { Command } from "commander";
import { parseHostPort } from "../lib/address.ts";
import { UsageError } from "../lib/errors.ts";
import type { NbdListenOptions } from "../lib/nbd/server.ts";
import { startServe } from "../lib/serve.ts";
import { parseTime } from "../lib/time.ts";
import { formatBytes, formatTimeBoth, printJson, say } from "./_output.ts";
import { waitForStopSignal } from "./_signals.ts";

interface ServeFlags {
  at: string;
  toFlush?: boolean;
  socket?: string;
  listen?: string;
  export: string;
  verbose?: boolean;
  json?: boolean;
  writableOverlay?: string;
}

/** Builds the `serve` command. */
export function serveCommand(): Command {
  return new Command("serve")
    .description(
      "serve the device as it was at a time over NBD, read-only, straight from the logdir (no restore)",
    )
    .argument("<logdir>", "log directory to read")
    .requiredOption(
      "--at <time>",
      "ISO 8601, now, -15m, @<unix-seconds>, seq:<n> or mark:<name>",
    )
    .option("--to-flush", "round down to the last flush at or before TIME (filesystem-consistent)")
    .option("--socket <path>", "serve NBD on this unix socket")
    .option("--listen <host:port>", "serve NBD on this TCP address")
    .option("--export <name>", "export name", "")
    .option(
      "--writable-overlay <dir>",
      "accept writes into a throwaway overlay file in DIR (to boot or fsck the past); the logdir is never written",
    )
    .option("--verbose", "log every connection")
    .option("--json", "print a JSON line on stdout once serving (for scripts)")
    .addHelpText(
      "after",
      "\nExample (look at the filesystem as it was at 02:13, without restoring):\n" +
        "  sectorlog serve /var/lib/sectorlog/vm1 --at '2026-11-24 02:13' --to-flush --socket /run/past.sock &\n" +
        "  nbdfuse /mnt/nbd --unix /run/past.sock &\n" +
        "  mount -o ro,noload $(losetup --find --show --read-only /mnt/nbd/nbd) /mnt/past\n" +
        "\nWrites are refused (EPERM) unless --writable-overlay DIR, whose file is unlinked at once and\n" +
        "gone when serve stops. SIGINT/SIGTERM stop it cleanly. It takes no lock: watch,\n" +
        "receive and compact go on meanwhile (files a compaction removes stay readable).\n",
    )
    .action(async (logdir: string, flags: ServeFlags) => {
      const listen = listenOptions(flags);
      const at = flags.at === "now" ? undefined : parseTime(flags.at);
      const serve = await startServe(logdir, {
        at,
        toFlush: flags.toFlush,
        listen,
        exportName: flags.export,
        overlayDir: flags.writableOverlay,
        logger: (event) => {
          if (event.level === "debug" || (event.level === "info" && flags.verbose !== true)) return;
          const cause = event.error instanceof Error ? `: ${event.error.message}` : "";
          say(`sectorlog serve: ${event.message}${cause}`);
        },
      });
      const info = serve.view.info;
      const where = "path" in listen
        ? `unix socket ${listen.path}`
        : `${listen.hostname}:${(serve.nbd.addr as Deno.NetAddr).port}`;
      if (flags.json === true) {
        printJson({ command: "serve", listening: where, ...info });
      }
      say(
        `sectorlog serve: serving ${logdir} (${formatBytes(info.deviceBytes)}) as of ${
          formatTimeBoth(info.targetUs)
        }, seq ${info.targetSeq}, ${
          flags.writableOverlay === undefined
            ? "read-only"
            : `writable (overlay in ${flags.writableOverlay}, thrown away on stop)`
        } on ${where} (index of ${info.extents} extents over ${info.files} files, opened in ${info.openMs} ms)`,
      );
      await waitForStopSignal(serve.nbd.finished);
      say("sectorlog serve: stopping");
      await serve.stop();
      say("sectorlog serve: stopped cleanly");
    });
}

function listenOptions(flags: ServeFlags): NbdListenOptions {
  if ((flags.socket === undefined) === (flags.listen === undefined)) {
    throw new UsageError(
      "Cannot start serve: give exactly one of --socket PATH or --listen HOST:PORT",
    );
  }
  if (flags.socket !== undefined) return { path: flags.socket };
  return parseHostPort(flags.listen!, "--listen");
}
