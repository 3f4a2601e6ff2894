# run by do_file_before_use.t
use strict;
use warnings;
use lib "tests/prove_suite/lib";
BEGIN { $ENV{ENV_AT_LOAD_MODE} = 'from-the-done-file' }
use EnvAtLoad;
use Test::More tests => 1;
is $EnvAtLoad::MODE, 'from-the-done-file', 'the module read %ENV as the done file set it';
1;
