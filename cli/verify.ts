/** `sectorlog verify <logdir>`: checksums, sequence, torn tails. Exit 3 on a problem. */
import { Command } from "commander";
import { EXIT_INTEGRITY } from "../lib/errors.ts";
import { isS3Url } from "../lib/store/s3_url.ts";
import { withLocalCopy } from "../lib/store/store_copy.ts";
import { verifyLogdir, type VerifyResult } from "../lib/verify.ts";
import { formatBytes, printJson, progressBar, say } from "./_output.ts";
import { openStoreLogdir, type S3Flags, withS3Options } from "./_s3.ts";

/** Builds the `verify` command. */
export function verifyCommand(): Command {
  return withS3Options(new Command("verify"))
    .description("check the base snapshot, every entry's checksums, seq continuity and time order")
    .argument("<logdir>", "log directory, or s3://bucket/prefix (every object is fetched)")
    .option("--json", "print a JSON summary on stdout")
    .addHelpText("after", "\nExample:\n  sectorlog verify /var/lib/sectorlog/vm1 || alert-admin\n")
    .action(async (logdir: string, flags: { json?: boolean } & S3Flags) => {
      const progress = progressBar("verify", flags.json !== true);
      let result;
      try {
        const verify = (from: string) =>
          verifyLogdir(from, { onProgress: (d, t) => progress.update(d, t) });
        result = isS3Url(logdir) ? await verifyStore(logdir, flags, verify) : await verify(logdir);
      } finally {
        progress.stop();
      }
      if (!result.ok) Deno.exitCode = EXIT_INTEGRITY;
      if (flags.json === true) {
        printJson({ command: "verify", logdir, ...result });
        return;
      }
      for (const problem of result.problems) {
        say(`sectorlog: ${problem.message}`);
      }
      if (result.tornTail !== undefined) {
        const t = result.tornTail;
        say(
          `note: ${t.path} ends in a torn tail of ${t.bytes} bytes at offset ${t.offsetBytes} (${t.problem}); the next writer truncates it`,
        );
      }
      const summary =
        `${result.entries} entries (seq ${result.firstSeq}..${result.lastSeq}) in ${result.segments} segments, ${result.levels} levels, ${
          formatBytes(result.bytesChecked)
        } checked`;
      say(
        result.ok ? `ok: ${summary}` : `FAILED: ${result.problems.length} problem(s); ${summary}`,
      );
    });
}

/** Verifies an `s3://` logdir: every object fetched into a temporary local copy, then checked. */
async function verifyStore(
  url: string,
  flags: S3Flags,
  verify: (logdir: string) => Promise<VerifyResult>,
): Promise<VerifyResult> {
  const source = await openStoreLogdir(url, flags, "<logdir>");
  try {
    return await withLocalCopy(source, { kind: "all" }, async (copy) => {
      const result = await verify(copy.logdir);
      for (const problem of result.problems) {
        problem.path = copy.rename(problem.path);
        problem.message = copy.rename(problem.message);
      }
      return result;
    });
  } finally {
    source.store.close();
  }
}
