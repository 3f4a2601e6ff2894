use strict;
use warnings;
use Test::More;
SKIP: { skip 'not here', 1; ok 0 }
TODO: { local $TODO = 'later'; ok 0, 'a todo failing' }
done_testing;
