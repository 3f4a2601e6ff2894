# A base for apps as their generators write them: it preloads the shop
# (whose bin/app.psgi finds its lib/ with FindBin) and serves the Catalyst
# scaffold's app (its lib/ on PERL5LIB).
use strict;
use warnings;
use File::Basename ();
use File::Spec ();
use Plack::Util ();

my $here = File::Spec->rel2abs(File::Basename::dirname(__FILE__));
Plack::Util::load_psgi("$here/shop/bin/app.psgi");
Plack::Util::load_psgi("$here/../catalyst/scaffold.psgi");
