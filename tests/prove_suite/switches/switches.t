use strict;
use warnings;
use Test::More tests => 2;
# run with HARNESS_PERL_SWITCHES=-MSwitchProbe and PERL5OPT=-w by test_prove.py
ok $INC{'SwitchProbe.pm'}, 'HARNESS_PERL_SWITCHES -M loaded the module into the test';
ok $^W, 'PERL5OPT -w set $^W';
