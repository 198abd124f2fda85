#!/usr/bin/env bash
# Debian's Chromium + chromedriver, which the demo's browser test drives through Selenium (the tests never
# download a browser).
exec bash "$(dirname "$0")/apt-install.sh" "chromium chromedriver" chromium chromium-driver
