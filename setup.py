"""Packaging for smtprelay.

The twistd plugin lives in ``twisted/plugins/`` (a drop-in, not a package: that
directory must never get an ``__init__.py``, or it would shadow Twisted's own).
After an install the plugin cache is regenerated so that ``twistd`` finds
``smtprelay`` at once, even when site-packages is read-only later.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.develop import develop
from setuptools.command.install import install

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "smtprelay" / "__init__.py").read_text(), re.M
).group(1)


def _regenerate_plugin_cache():
    try:
        from twisted.plugin import IPlugin, getPlugins

        list(getPlugins(IPlugin))
    except Exception as e:  # an install must not fail for a cache
        print(f"smtprelay: could not regenerate the Twisted plugin cache: {e}")


class InstallAndCache(install):
    def run(self):
        install.run(self)
        self.execute(_regenerate_plugin_cache, (), msg="Regenerating Twisted plugin cache")


class DevelopAndCache(develop):
    def run(self):
        develop.run(self)
        self.execute(_regenerate_plugin_cache, (), msg="Regenerating Twisted plugin cache")


setup(
    name="smtprelay",
    version=VERSION,
    description="SMTP-to-API email relay: Microsoft Graph, Gmail API or upstream SMTP",
    long_description=(HERE / "README.rst").read_text(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["smtprelay", "smtprelay.*"]) + ["twisted.plugins"],
    package_data={
        "twisted.plugins": ["smtprelay_plugin.py"],
        "smtprelay.admin": ["static/*"],
    },
    include_package_data=True,
    install_requires=[
        "Twisted[tls]>=24.7",
        "treq>=23.11",
        "klein>=23.12",
        "msal>=1.28",
        "google-auth>=2.29",
        "zope.interface>=6",
        "attrs>=23.2",
        "service-identity>=24.1",
        "pyOpenSSL>=24",
        "cryptography>=42",
        "psycopg[binary]>=3.1",
        "prometheus-client>=0.20",
        "tomlkit>=0.12",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "trustme>=1.1",
            "aiosmtpd>=1.4",
            "playwright>=1.44",
            "docutils>=0.20",
            "ruff>=0.6",
            "mypy>=1.11",
            "mypy-zope>=1.0",
        ],
    },
    entry_points={"console_scripts": ["smtprelay = smtprelay.cli:main"]},
    cmdclass={"install": InstallAndCache, "develop": DevelopAndCache},
    classifiers=[
        "Framework :: Twisted",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)
