/** `sectorlog watch <device> <logdir> (--socket PATH | --listen HOST:PORT)`: the LAD over NBD. */
import { Command } from "commander";
import { parseHostPort } from "../lib/address.ts";
import { UsageError } from "../lib/errors.ts";
import type { NbdListenOptions } from "../lib/nbd/server.ts";
import { startWatch } from "../lib/watch.ts";
import { formatBytes, say } from "./_output.ts";
import { waitForStopSignal } from "./_signals.ts";

interface WatchFlags {
  socket?: string;
  listen?: string;
  export: string;
  readOnly?: boolean;
  verbose?: boolean;
}

/** Builds the `watch` command. */
export function watchCommand(): Command {
  return new Command("watch")
    .description(
      "serve the device over NBD, journaling every write with its time (the log-assisted disk)",
    )
    .argument("<device>", "block device or image file (the snapshot's device)")
    .argument("<logdir>", "log directory made by `sectorlog snapshot`")
    .option("--socket <path>", "serve NBD on this unix socket")
    .option("--listen <host:port>", "serve NBD on this TCP address")
    .option("--export <name>", "export name", "")
    .option("--read-only", "refuse writes (nothing is journaled)")
    .option("--verbose", "log every connection")
    .addHelpText(
      "after",
      "\nExample:\n  sectorlog watch disk.img /var/lib/sectorlog/vm1 --socket /run/vm1.sock &\n" +
        "  qemu-io -f raw 'nbd+unix:///?socket=/run/vm1.sock' -c 'write -P 0xab 0 64k'\n" +
        "\nSIGINT/SIGTERM stop it cleanly: requests in flight finish, the journal is flushed and sealed.\n",
    )
    .action(async (device: string, logdir: string, flags: WatchFlags) => {
      const listen = listenOptions(flags);
      const watch = await startWatch(device, logdir, {
        listen,
        exportName: flags.export,
        readOnly: flags.readOnly,
        logger: (event) => {
          if (event.level === "debug" || (event.level === "info" && flags.verbose !== true)) return;
          say(`sectorlog watch: ${event.message}`);
        },
      });
      const recovery = watch.disk.recovery;
      if (recovery.tornBytes > 0 || recovery.replayedEntries > 0) {
        say(
          `sectorlog watch: recovered after a crash: truncated a torn tail of ${recovery.tornBytes} bytes, re-applied ${recovery.replayedEntries} entries to the device`,
        );
      }
      const where = "path" in listen
        ? `unix socket ${listen.path}`
        : `${listen.hostname}:${listen.port}`;
      say(
        `sectorlog watch: serving ${device} (${formatBytes(watch.disk.sizeBytes)}) on ${where}${
          flags.readOnly ? " read-only" : ""
        }, journal in ${logdir}`,
      );
      await waitForStopSignal();
      say("sectorlog watch: stopping: finishing requests in flight, flushing and sealing");
      await watch.stop();
      say("sectorlog watch: stopped cleanly");
    });
}

function listenOptions(flags: WatchFlags): NbdListenOptions {
  if ((flags.socket === undefined) === (flags.listen === undefined)) {
    throw new UsageError(
      "Cannot start watch: give exactly one of --socket PATH or --listen HOST:PORT",
    );
  }
  if (flags.socket !== undefined) return { path: flags.socket };
  return parseHostPort(flags.listen!, "--listen");
}
