# The psgi file catalyst.pl writes into a new app (myapp.psgi): no `use lib`,
# the app's lib/ is on PERL5LIB (plackup -Ilib, or env = PERL5LIB=... in
# the vassal file).
use strict;
use warnings;

use CatApp;

my $app = CatApp->apply_default_middlewares(CatApp->psgi_app);
$app;
