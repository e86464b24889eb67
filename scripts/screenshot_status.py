"""A PNG screenshot of livetrain's status page (for the README), with Debian's headless chromium.

    python scripts/screenshot_status.py http://localhost:9090/ status.png [--width 1440] [--height 900]
        [--full-page] [--wait 1.5] [--user U --password P]

It opens the URL as a browser does (Accept: text/html, so GET / serves the page rather than the health JSON),
waits until the page has refreshed itself once from /dashboard plus --wait seconds, and saves the PNG.
Basic auth: --user/--password, else BASIC_AUTH_USER / BASIC_AUTH_PASS from the environment. It needs the
`playwright` Python package (the [test] extra) and chromium at --chromium (default /usr/bin/chromium); it
downloads nothing and the page loads nothing from the internet.
"""

from __future__ import annotations

import argparse
import os
import sys

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the status page, e.g. http://localhost:9090/")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--full-page", action="store_true", help="the whole page, not only the first screen")
    parser.add_argument("--wait", type=float, default=1.5, help="seconds to wait after the page refreshed itself")
    parser.add_argument("--user", default=os.environ.get("BASIC_AUTH_USER", ""))
    parser.add_argument("--password", default=os.environ.get("BASIC_AUTH_PASS", ""))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        try:
            credentials = {"username": args.user, "password": args.password} if args.user else None
            context = browser.new_context(viewport={"width": args.width, "height": args.height},
                                          http_credentials=credentials)
            page = context.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            response = page.goto(args.url, wait_until="load")
            if response is None or not response.ok:
                print(f"{args.url} answered {response.status if response else 'nothing'}", file=sys.stderr)
                return 1
            if page.locator("#refresh").count():  # the status page (not some other URL): wait for its first refresh
                page.wait_for_function("document.getElementById('refresh').textContent.startsWith('updated')",
                                       timeout=15000)
            page.wait_for_timeout(int(args.wait * 1000))
            page.screenshot(path=args.out, full_page=args.full_page)
        finally:
            browser.close()
    for problem in problems:
        print(f"page console error: {problem}", file=sys.stderr)
    print(f"wrote {args.out} ({args.width}x{args.height}{', full page' if args.full_page else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
