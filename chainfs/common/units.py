"""Binary size units (bytes), defined once for the whole package."""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
