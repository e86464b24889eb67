"""Tools that play the other side: a throwaway Label Studio, `livetrain serve` as a child process, and an
annotator that replays a COCO dataset (``livetrain simulate``). Used by the e2e tests and benchmarks."""
