/**
 * The flags every subcommand that reads or writes an `s3://bucket/prefix` logdir shares, and
 * opening that logdir from them.
 *
 * @module
 */
import type { Command } from "commander";
import { parseS3Url } from "../lib/store/s3_url.ts";
import type { StoreLogdir } from "../lib/store/store_logdir.ts";

/** The object-storage flags of a subcommand. */
export interface S3Flags {
  s3Endpoint?: string;
  s3Region?: string;
}

/** Adds `--s3-endpoint` and `--s3-region` to `command`. */
export function withS3Options(command: Command): Command {
  return command
    .option(
      "--s3-endpoint <url>",
      "S3 endpoint of s3:// logdirs, path-style (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or AWS); credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile",
    )
    .option(
      "--s3-region <region>",
      "S3 region (default: AWS_REGION, AWS_DEFAULT_REGION or us-east-1)",
    );
}

/**
 * Opens the logdir at `url` (`s3://bucket/prefix`); `argument` is named in errors. The AWS SDK
 * is loaded here, only by commands that use object storage.
 */
export async function openStoreLogdir(
  url: string,
  flags: S3Flags,
  argument: string,
): Promise<StoreLogdir> {
  const location = parseS3Url(url, argument);
  const { S3Store } = await import("../lib/store/s3_store.ts");
  const store = new S3Store(location.bucket, {
    endpoint: flags.s3Endpoint,
    region: flags.s3Region,
  });
  return { store, prefix: location.prefix };
}
