#!/bin/sh
# Builds the Lab front end into ../jupyter_ext/labextension with this machine's Node.js, against
# the JupyterLab that $PYTHON (default: python3) imports, as `jupyter labextension build` did.
set -e
cd "$(dirname "$0")"
core=$("${PYTHON:-python3}" -c 'import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), "staging"))')
npx tsc
node node_modules/@jupyterlab/builder/lib/build-labextension.js --core-path "$core" .
# How the extension was installed (`jupyter labextension list` shows it), shipped in its folder.
cp install.json ../jupyter_ext/labextension/install.json
