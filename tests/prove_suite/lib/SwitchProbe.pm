package SwitchProbe;
# Loaded into a test by HARNESS_PERL_SWITCHES=-MSwitchProbe (tests/test_prove.py).
1;
