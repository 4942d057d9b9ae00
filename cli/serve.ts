/**
 * `sectorlog serve <logdir> --at TIME (--socket PATH | --listen HOST:PORT)`: a read-only NBD
 * export of the device as it was at TIME, read from the logdir without a restore. An
 * `s3://bucket/prefix` logdir is served from a temporary local copy of the objects TIME needs,
 * which lives as long as the server and is removed when it stops.
 */
import { Command } from "commander";
import { parseHostPort } from "../lib/address.ts";
import { UsageError } from "../lib/errors.ts";
import type { NbdListenOptions } from "../lib/nbd/server.ts";
import { startServe } from "../lib/serve.ts";
import { isS3Url } from "../lib/store/s3_url.ts";
import { copyNeedFor, type LocalCopy, withLocalCopy } from "../lib/store/store_copy.ts";
import { parseTime, type TimeSpec } from "../lib/time.ts";
import { formatBytes, formatTimeBoth, printJson, say } from "./_output.ts";
import { openStoreLogdir, type S3Flags, withS3Options } from "./_s3.ts";
import { waitForStopSignal } from "./_signals.ts";

interface ServeFlags extends S3Flags {
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
  return withS3Options(new Command("serve"))
    .description(
      "serve the device as it was at a time over NBD, read-only, straight from the logdir (no restore)",
    )
    .argument("<logdir>", "log directory to read, or s3://bucket/prefix")
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
        "  sectorlog serve s3://backups/vm1 --at -2h --listen 127.0.0.1:10809 --s3-endpoint http://127.0.0.1:8080\n" +
        "\nWrites are refused (EPERM) unless --writable-overlay DIR, whose file is unlinked at once and\n" +
        "gone when serve stops. SIGINT/SIGTERM stop it cleanly. It takes no lock: watch,\n" +
        "receive and compact go on meanwhile (files a compaction removes stay readable).\n" +
        "An s3:// logdir is served from a temporary local copy of only the objects TIME needs\n" +
        "(fetched before serving starts, removed when serve stops).\n",
    )
    .action(async (logdir: string, flags: ServeFlags) => {
      const listen = listenOptions(flags);
      const at = flags.at === "now" ? undefined : parseTime(flags.at);
      if (!isS3Url(logdir)) return await serveLogdir(logdir, logdir, at, listen, flags);
      await serveFromStore(logdir, at, listen, flags);
    });
}

/**
 * Serves `path` (a logdir) until SIGINT/SIGTERM, calling it `logdir` in messages (an s3:// logdir
 * is served from a copy; `copy` then says what was downloaded).
 */
async function serveLogdir(
  path: string,
  logdir: string,
  at: TimeSpec | undefined,
  listen: NbdListenOptions,
  flags: ServeFlags,
  copy?: LocalCopy,
  onServing?: () => void,
): Promise<void> {
  const serve = await startServe(path, {
    at,
    toFlush: flags.toFlush,
    listen,
    exportName: flags.export,
    overlayDir: flags.writableOverlay,
    logger: (event) => {
      if (event.level === "debug" || (event.level === "info" && flags.verbose !== true)) return;
      const cause = event.error instanceof Error ? `: ${event.error.message}` : "";
      say(`sectorlog serve: ${copy?.rename(event.message) ?? event.message}${cause}`);
    },
  });
  const info = serve.view.info;
  const where = "path" in listen
    ? `unix socket ${listen.path}`
    : `${listen.hostname}:${(serve.nbd.addr as Deno.NetAddr).port}`;
  const downloaded = copy === undefined ? undefined : {
    objectsDownloaded: copy.objectsDownloaded,
    bytesDownloaded: copy.bytesDownloaded,
    segmentsFetched: copy.segmentsFetched,
    segmentsListed: copy.segmentsListed,
  };
  if (flags.json === true) {
    printJson({ command: "serve", listening: where, ...info, logdir, ...downloaded });
  }
  say(
    `sectorlog serve: serving ${logdir} (${formatBytes(info.deviceBytes)}) as of ${
      formatTimeBoth(info.targetUs)
    }, seq ${info.targetSeq}, ${
      flags.writableOverlay === undefined
        ? "read-only"
        : `writable (overlay in ${flags.writableOverlay}, thrown away on stop)`
    } on ${where} (index of ${info.extents} extents over ${info.files} files, opened in ${info.openMs} ms${
      copy === undefined
        ? ""
        : `; ${copy.objectsDownloaded} objects (${
          formatBytes(copy.bytesDownloaded)
        }) fetched into a temporary copy`
    })`,
  );
  const stopped = waitForStopSignal(serve.nbd.finished);
  onServing?.();
  await stopped;
  say("sectorlog serve: stopping");
  await serve.stop();
  say("sectorlog serve: stopped cleanly");
}

/**
 * `serve s3://bucket/prefix`: the objects TIME needs are fetched into a temporary local logdir
 * (under a folder of our own, so that a signal during the download can remove it too), served,
 * and removed when serve stops.
 */
async function serveFromStore(
  url: string,
  at: TimeSpec | undefined,
  listen: NbdListenOptions,
  flags: ServeFlags,
): Promise<void> {
  const source = await openStoreLogdir(url, flags, "<logdir>");
  const cacheDir = await Deno.makeTempDir({ prefix: "sectorlog-serve-" });
  // Until serving starts, a signal stops the download: remove what it fetched and exit.
  const interrupt = () => {
    say("sectorlog serve: interrupted while fetching objects; removing the temporary copy");
    Deno.removeSync(cacheDir, { recursive: true });
    Deno.exit(1);
  };
  Deno.addSignalListener("SIGINT", interrupt);
  Deno.addSignalListener("SIGTERM", interrupt);
  let listening = false;
  const stopInterrupting = () => {
    if (listening) return;
    listening = true;
    Deno.removeSignalListener("SIGINT", interrupt);
    Deno.removeSignalListener("SIGTERM", interrupt);
  };
  try {
    await withLocalCopy(
      source,
      copyNeedFor(at),
      (copy) => serveLogdir(copy.logdir, url, at, listen, flags, copy, stopInterrupting),
      { cacheDir },
    );
  } finally {
    stopInterrupting();
    source.store.close();
    await Deno.remove(cacheDir, { recursive: true }).catch(() => {});
  }
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
