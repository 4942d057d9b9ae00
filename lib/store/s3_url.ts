/**
 * `s3://bucket/prefix` logdir names. Kept apart from the S3 client so that commands can tell an
 * object-storage logdir from a local one without loading the AWS SDK.
 *
 * @module
 */
import { UsageError } from "../errors.ts";

/** Where a logdir lives in object storage: `s3://bucket/prefix`. */
export interface S3Location {
  bucket: string;
  /** Key prefix without leading or trailing slash ("" for the bucket's root). */
  prefix: string;
}

/** True when `text` names an object-storage logdir (`s3://…`). */
export function isS3Url(text: string): boolean {
  return text.startsWith("s3://");
}

/** Parses `s3://bucket/prefix`; `argument` is named in the error. */
export function parseS3Url(text: string, argument = "<logdir>"): S3Location {
  const match = /^s3:\/\/([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:\/(.*))?$/.exec(text);
  if (match === null) {
    throw new UsageError(
      `Invalid ${argument} ${JSON.stringify(text)}: expected s3://bucket/prefix`,
      { hint: "bucket names are 3 to 63 lowercase letters, digits, dots and hyphens" },
    );
  }
  const prefix = (match[2] ?? "").replace(/^\/+|\/+$/g, "");
  return { bucket: match[1], prefix };
}
