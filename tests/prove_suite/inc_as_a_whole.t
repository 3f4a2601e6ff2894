use strict;
use warnings;
use lib "tests/prove_suite/lib";
# what `use` of a module adds to %INC (as Module-Runtime's t/dependency.t
# checks): under perl the module's file, whatever the base preloaded
our %BEFORE;
BEGIN { %BEFORE = %INC }
use SuiteData;
our @ADDED;
BEGIN { @ADDED = sort grep { !exists $BEFORE{$_} } keys %INC }
print "1..1\n";
print "@ADDED" eq "SuiteData.pm" ? "ok 1\n" : "not ok 1 # added: @ADDED\n";
