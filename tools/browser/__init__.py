"""The app in headless Chromium: `driver` serves the app and drives it through Playwright (the browser tests,
`tests/browser`), `bench` times its pages and interactions (`python -m precompute bench --only app`).

Playwright is optional (`requirements-browser.txt`): importing this package does not import it.
"""
